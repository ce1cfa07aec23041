"""benchmarks.gpu_model (the GPU cost model on fake tensors) keeps working, at a small size; the design
properties it shows at the Qwen shapes hold (no weight-sized fp32 temporary per chunk, chunks of at
least 1024 rows on an 80 GB device); benchmarks.gpu_check's bookkeeping and the README renderer of
both. The modelled times are reported by the benchmark, never asserted against targets here."""

import json
import sys

import pytest
import torch

from benchmarks import gpu_check, gpu_model, report

SMALL = dict(rows=256, hs=64, ht=96, vocab=1000, vocab_size=990, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["vgs", "standard", "liger_jsd"])
def test_model_runs_at_a_small_size(name):
    if name == "liger_jsd":
        pytest.importorskip("liger_kernel.chunked_loss")
    c = gpu_model.model_case(name, k=dict(gpu_model.CONSTANTS), **SMALL)
    assert c["name"] == name and c["rows"] == 256
    for key in ("modelled_ms", "gemm_floor_ms", "peak_temp_bytes", "gemm_flops", "non_gemm_bytes"):
        assert c[key] > 0, key
    assert c["modelled_ms"] >= c["gemm_floor_ms"] * 0.999  # GEMM time alone reaches the floor's
    assert c["chunk_rows"] >= 1
    if name != "liger_jsd":
        assert c["weight_sized_temporaries"] == 1  # the fp32 weight-gradient accumulator only
        assert c["row_kernels"] >= 1


def test_model_at_qwen_shapes_has_no_weight_sized_temporary_per_chunk():
    """B*T = 16384, V = 151936, H 2048 / 4096, bf16: one fp32 [V, H] tensor (the accumulator) for
    the whole call, chunks of >= 1024 rows on an 80 GB device, the minimal GEMMs plus corrections."""
    c = gpu_model.model_case("vgs", 16384, 2048, 4096, 151936, 151669, torch.bfloat16, dict(gpu_model.CONSTANTS))
    assert c["weight_sized_temporaries"] == 1, c["weight_sized_allocations"]
    assert c["chunk_rows"] >= 1024
    assert c["gemm_flops_over_floor"] < 1.05


def test_model_main_writes_the_results_json(tmp_path, monkeypatch, capsys):
    before = {"cases": [dict(gpu_model.model_case("vgs", k=dict(gpu_model.CONSTANTS), **SMALL), name="vgs")],
              "package_git_commit": "abc1234"}
    (tmp_path / "gpu_model-before.json").write_text(json.dumps(before))
    assert gpu_model.main(["--rows", "128", "--hs", "32", "--ht", "48", "--vocab", "500", "--vocab-size", "490",
                           "--cases", "vgs", "standard", "--out-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_model.json").read_text())
    names = [c["name"] for c in doc["cases"]]
    assert names == ["vgs", "standard"]
    required = {"name", "rows", "modelled_ms", "gemm_floor_ms", "chunk_rows", "peak_temp_bytes",
                "weight_sized_temporaries"}
    assert all(required <= set(c) for c in doc["cases"])
    assert doc["before"]["git_commit"] == "abc1234" and doc["constants"]["gemm_tflops"] > 0
    assert "before: vgs" in capsys.readouterr().out
    doc["_file"] = "gpu_model.json"
    text = "\n".join(report.gpu_model_section(doc))
    assert "before: `vgs`" in text and "GEMM floor" in text


def test_report_separates_measured_and_modelled(tmp_path):
    doc = {"benchmark": "gpu_model", "created_utc": "x", "constants": dict(gpu_model.CONSTANTS),
           "shapes": {"dtype": "bfloat16", "vocab": 10}, "versions": {}, "_file": "gpu_model.json",
           "cases": [dict(name="vgs", rows=8, chunk_rows=4, gemm_floor_ms=1.0, modelled_ms=1.2,
                          ratio_to_gemm_floor=1.2, peak_temp_bytes=10, weight_sized_temporaries=1)]}
    text = report.render([doc])
    assert text.index("### Measured") < text.index("### Modelled") < text.index("GPU cost model")
    assert "No GPU measurements yet" in text


def test_gpu_check_needs_a_gpu_and_calibrates_from_results(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        assert gpu_check.main(["--budget", "5"]) == 2
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"results": [{"kernel": "triton", "gb_per_s": 2500.0}, {"kernel": "cuda",
                                                                                      "gb_per_s": 2800.0}]}))
    kern = tmp_path / "kernels.json"
    kern.write_text(json.dumps({"results": [{"case": "gemm_floor:vgs", "status": "ok", "tflops_per_s": 650.0}]}))
    cal = gpu_check._calibration(rows, kern)
    assert cal == {"hbm_tbps": 2.8, "gemm_tflops": 650.0}
    steps = gpu_check.Steps(budget=30)
    ok = steps.run("report", [sys.executable, "-c", "print('hi')"])
    assert ok["status"] == "ok" and "hi" in ok["output_tail"]
    bad = steps.run("report", [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert bad["status"] == "failed" and bad["returncode"] == 3
    late = gpu_check.Steps(budget=1).run("kernels", [sys.executable, "-c", "pass"])
    assert late["status"] == "skipped" and "out of time" in late["reason"]
