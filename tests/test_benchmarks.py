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
    _quick_assertions_n(doc)
    assert doc["standard_text_streams"] and doc["anchor_check"]["relative_spread"] < 1e-4
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
    assert all(r["n"] == len(r["samples"]) == doc["timing"]["repeats"] for r in doc["results"].values())
    assert all(t["n"] == doc["timing"]["repeats"] for t in doc["targets"])
    assert doc["standard_text_streams"]


def _quick_assertions_n(doc: dict) -> None:
    """Every timed cell says how many runs its median is over, in the JSON and in the tables."""
    for r in doc["results"]:
        if r.get("status") == "ok":
            assert "rss_hwm_delta_bytes" not in r
    assert "(n=" in doc["tables_markdown"]


def test_peak_memory_is_the_allocator_peak_of_the_calling_thread():
    import threading

    import torch

    from benchmarks import common as C

    nbytes = 75 * 2**20

    def fn():
        a = torch.ones(nbytes // 4)  # 75 MiB held at the peak, freed at the end
        t = threading.Thread(target=lambda: torch.ones(nbytes // 4))  # another thread: not counted
        t.start()
        t.join()
        del a

    out = C.peak_memory(fn, None, torch.device("cpu"))
    assert set(out) <= {"peak_bytes", "method", "other_thread_memory_events"}
    assert nbytes <= out["peak_bytes"] < nbytes + 2**20, out


def test_repeat_defaults():
    from benchmarks import kernels as K
    from benchmarks import step as S

    full = K.parse_args([])
    assert full.min_repeats >= 5 and full.repeats >= full.min_repeats
    quick = K.parse_args(["--quick"])
    assert quick.repeats <= 3 and quick.min_repeats == 1
    assert K.parse_args(["--repeats", "3"]).min_repeats == 3
    assert S.parse_args([]).repeats >= 5 and S.parse_args(["--quick"]).repeats <= 3


@pytest.mark.slow
def test_kernels_builds_each_case_once_per_bt(monkeypatch):
    """Each case is built once per B*T (its closure reused by warm-up, memory and timed runs), in
    the interleaved order, and every cell records n."""
    from benchmarks import kernels as K

    builds: dict[str, list[int]] = {}
    calls: list[str] = []
    select = K.select_cases

    def counting(device, args):
        cases, skipped = select(device, args)
        for c in cases:
            def build(x, _c=c, _inner=c.build):
                builds.setdefault(_c.name, []).append(x.hs.shape[0])
                fn = _inner(x)

                def run():
                    calls.append(_c.name)
                    fn()
                return run
            c.build = build
        return cases, skipped

    monkeypatch.setattr(K, "select_cases", counting)
    args = K.parse_args(["--quick", "--device", "cpu", "--bts", "16", "32", "--hs", "8", "--ht", "8", "--vocab",
                         "64", "--cases", "gemm_floor", "std:", "torch_rkl", "--repeats", "3", "--budget", "1e9",
                         "--no-plots"])
    doc = K.run(args)
    names = list(doc["cases"])
    assert {"gemm_floor:vgs", "gemm_floor:opd", "torch_rkl"} <= set(names)
    assert builds == {n: [16, 32] for n in names}
    for r in doc["results"]:
        assert r["status"] == "ok" and r["n"] == 3 and len(r["times_s"]) == 3, r
    # Per B*T: warm-up + memory run per case, then 3 interleaved rounds, every other one reversed.
    per_bt = len(calls) // 2
    timed = calls[2 * len(names):per_bt]
    assert timed == names + names[::-1] + names
    assert doc["standard_text_streams"]


def _synthetic_kernels_doc() -> dict:
    """A kernels result shaped as files written before 'n' was recorded (no n, no times_s)."""
    res = []
    for bt in (64, 128):
        for case, t, mem in (("vgs:cpu", 0.3, 100), ("liger:chunked", 0.1, 100), ("gemm_floor:vgs", 0.05, 0)):
            res.append({"bt": bt, "case": case, "group": case.split(":")[0], "status": "ok", "median_s": t,
                        "peak_bytes": mem})
    res.append({"bt": 128, "case": "vgs:reference", "group": "vgs", "status": "skipped", "reason": "RAM"})
    return {
        "benchmark": "kernels", "quick": False, "created_utc": "2026-01-01T00:00:00Z", "_file": "kernels-x.json",
        "device": {"type": "cpu", "name": "CPU (test)", "cpu_count": 2}, "versions": {"torch": "2"},
        "shapes": {"bt": [64, 128], "hidden_student": 8, "hidden_teacher": 8, "vocab": 64, "dtype": "float32"},
        "timing": {"repeats": 5, "min_repeats": 2},
        "cases": {"vgs:cpu": "", "vgs:reference": "", "liger:chunked": "", "gemm_floor:vgs": ""},
        "results": res,
        "ratios": {"rows": [{"bt": bt, "backend": "cpu", "time_s": 0.3, "peak_bytes": 100,
                             "time_vs_liger:chunked": 3.0, "mem_vs_liger:chunked": 1.0,
                             "gemm_floor_fraction": 0.17} for bt in (64, 128)],
                   "targets": [{"target": "vgs_time_vs_liger", "bt": bt, "backend": "cpu", "anchor": "liger:chunked",
                                "value": 3.0, "bound": "<= 2.0", "met": False, "binding": True} for bt in (64, 128)]},
    }


def _synthetic_step_doc() -> dict:
    res = {m: {k: 1.0 for k in ("rollout", "forwards", "loss_backward", "optimizer", "non_generation", "step")}
           for m in ("opd", "vgs")}
    return {"benchmark": "step", "quick": False, "created_utc": "2026-01-01T00:00:00Z", "_file": "step-x.json",
            "device": {"type": "cpu", "name": "CPU (test)"}, "versions": {"torch": "2"}, "preset": "tiny",
            "config": {"dtype": "float32", "batch": 1, "response": 2, "vocab": 64}, "timing": {"repeats": 3},
            "results": res, "ratios": {"vgs_over_opd": {k: 1.0 for k in res["opd"]}},
            "targets": [{"part": "step", "value": 1.0, "bound": "<= 1.10", "met": True}]}


def test_report_renders_old_files_and_fills_the_readme_markers(tmp_path):
    from benchmarks import report

    text = report.render([_synthetic_kernels_doc(), _synthetic_step_doc()])
    assert "CPU (test)" in text
    assert "300.0 ms (n=?)" in text  # no n in the file: shown as unknown
    for bt in (64, 128):  # every B*T row, those missing a target included
        assert f"| {bt} " in text
    assert text.count(report.MISSED) >= 2
    assert "| n " in text and "?" in text  # the step table's n column
    readme = tmp_path / "README.md"
    readme.write_text(f"# X\n\n## Benchmarks\n\n{report.START}\nold\n{report.END}\n\n## After\n")
    rdir = tmp_path / "results"
    rdir.mkdir()
    for doc in (_synthetic_kernels_doc(), _synthetic_step_doc()):
        (rdir / doc.pop("_file")).write_text(json.dumps(doc))
    assert report.main(["--results-dir", str(rdir), "--readme", str(readme)]) == 0
    new = readme.read_text()
    assert new.startswith("# X\n\n## Benchmarks\n\n" + report.START + "\n") and new.endswith(report.END + "\n\n## After\n")
    assert "old" not in new and "(n=?)" in new
    readme.write_text("# no markers\n")
    assert report.main(["--results-dir", str(rdir), "--readme", str(readme)]) == 1
    assert readme.read_text() == "# no markers\n"
