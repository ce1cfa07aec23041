"""``make gpu-check`` cannot pass while broken: on the CPU (``--device cpu --small``), a clean run passes and
each planted failure -- a missing package, an exception, a wrong number, the slab fallback of the weight-
gradient accumulation -- gives a non-zero exit naming the step; the step bookkeeping fails required steps
that cannot run and optional steps that fail."""

import json
import sys

import pytest

from benchmarks import gpu_check


def _run(tmp_path, *extra):
    out = tmp_path / "gc"
    rc = gpu_check.main(["--device", "cpu", "--small", "--only", "numerics", "--out", str(out), "--budget", "200",
                         *extra])
    return rc, json.loads((out / "summary.json").read_text())


def test_a_clean_cpu_run_passes(tmp_path):
    rc, summary = _run(tmp_path)
    assert rc == 0 and summary["passed"], summary["failed"]
    num = json.loads((tmp_path / "gc" / "numerics.json").read_text())
    assert num["failed"] == 0 and {r["check"] for r in num["results"]} == {"rows", "fused", "accumulate"}


@pytest.mark.parametrize("inject, step", [("missing_package", "env"), ("exception", "numerics"),
                                          ("wrong_number", "numerics"), ("slab_fallback", "numerics")])
def test_each_planted_failure_fails_the_check(tmp_path, inject, step):
    rc, summary = _run(tmp_path, "--inject", inject)
    assert rc != 0 and not summary["passed"] and step in summary["failed"], summary


def test_without_a_gpu_the_cuda_check_fails(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main(["--out", str(tmp_path), "--only", "numerics", "--budget", "30"]) == 1


def test_steps_bookkeeping(tmp_path):
    steps = gpu_check.Steps(budget=60, out=tmp_path)
    ok = steps.run("report", 10, False, [sys.executable, "-c", "print('hi')"], env=None)
    assert ok["status"] == "ok" and "hi" in ok["output_tail"] and steps.failed() == []
    bad = steps.run("kernels", 10, False, [sys.executable, "-c", "import sys; sys.exit(3)"], env=None)
    assert bad["status"] == "failed" and bad["returncode"] == 3 and steps.failed() == [bad]
    late = gpu_check.Steps(budget=1, out=tmp_path)
    assert late.run("kernels", 10, False, [sys.executable, "-c", "pass"], env=None)["status"] == "skipped"
    assert late.run("numerics", 10, True, [sys.executable, "-c", "pass"], env=None)["status"] == "failed"
    assert [r["step"] for r in late.failed()] == ["numerics"]
