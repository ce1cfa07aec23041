"""The README's "Use from other trainers" snippets run as written (the TRL one, which needs models
and data, is compiled; examples/trl_vgs.py runs the same trainer in tests/train/integrations/test_trl.py)."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def section_snippets(title: str) -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


SNIPPETS = section_snippets("Use from other trainers")


def test_the_section_has_the_four_trainers():
    joined = "\n".join(SNIPPETS)
    for needle in ("VGSLoss", "cu_seqlens=cu_seqlens", "vgs_distillation_loss", "VGSDistillationTrainer",
                   "vds_threshold"):
        assert needle in joined, needle


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_snippet_runs(i):
    code = SNIPPETS[i]
    if "trainer.train()" in code:  # needs models and a dataset
        compile(code, f"README snippet {i}", "exec")
        return
    if "integrations.verl" in code and importlib.util.find_spec("verl") is None:
        pytest.skip("verl is not installed (make install adds it)")
    namespace: dict = {}
    exec(compile(code, f"README snippet {i}", "exec"), namespace)
    if "out" in namespace and hasattr(namespace["out"], "loss"):
        assert namespace["out"].loss.isfinite().all()
