"""The benchmark entry points run in CI-sized form (``--quick``) and write well-formed JSON.

Only the shape of the output is checked: speed and memory targets are measured by the full runs
(``python -m benchmarks.kernels`` / ``python -m benchmarks.step``) and reported, never asserted here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(module: str, out_dir: Path, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(out_dir),
         *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())  # strict JSON: allow_nan=False on write


def _common(doc: dict, kind: str) -> None:
    assert doc["benchmark"] == kind
    assert doc["quick"] is True
    assert doc["device"]["type"] == "cpu" and doc["device"]["name"]
    for key in ("torch", "python"):
        assert doc["versions"][key]
    assert "triton" in doc["versions"] and "liger_kernel" in doc["versions"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_kernels_quick_json(tmp_path):
    doc = _run("benchmarks.kernels", tmp_path)
    _common(doc, "kernels")
    shapes = doc["shapes"]
    assert shapes["bt"] and shapes["vocab"] > 0 and shapes["dtype"] == "float32"
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert ok, doc["results"]
    for r in ok:
        assert r["bt"] in shapes["bt"] and r["case"] in doc["cases"]
        assert _finite(r["median_s"]) and r["median_s"] > 0 and r["n"] >= 1
        assert len(r["times_s"]) == r["n"]
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0
    names = {r["case"] for r in ok}
    # The materialised reference, the torch backend, the plain reverse KL and the GEMM floor always run.
    assert {"vgs:reference", "vgs:torch", "torch_rkl", "gemm_floor:vgs"} <= names
    assert all(r["status"] in ("ok", "skipped", "oom", "error") for r in doc["results"])
    assert "liger:triton" in doc["skipped"]  # Triton on CPU would be the interpreter: never benchmarked
    rows = doc["ratios"]["rows"]
    assert rows and all(_finite(v) for row in rows for k, v in row.items() if k not in ("backend",))
    for t in doc["ratios"]["targets"]:
        assert _finite(t["value"]) and isinstance(t["met"], bool)
    assert doc["tables_markdown"].startswith("## ")
    for png in doc.get("plots", []):
        assert Path(png).suffix == ".png"


@pytest.mark.slow
def test_step_quick_json(tmp_path):
    pytest.importorskip("transformers")
    doc = _run("benchmarks.step", tmp_path)
    _common(doc, "step")
    assert set(doc["results"]) == {"opd", "vgs", "opd4"}
    for m, r in doc["results"].items():
        for k in ("rollout", "forwards", "loss_backward", "optimizer", "non_generation", "step"):
            assert _finite(r[k]) and r[k] >= 0, (m, k)
        assert r["step"] >= r["non_generation"]
        assert all(_finite(s["loss"]) for s in r["samples"])
    for part in ("step", "non_generation"):
        assert _finite(doc["ratios"]["vgs_over_opd"][part])
    assert {t["part"] for t in doc["targets"]} == {"step", "non_generation"}
