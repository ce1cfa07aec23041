"""benchmarks.gpu_model (the GPU cost model on fake tensors) keeps working, at a small size; the design
properties it shows at the Qwen shapes hold (no weight-sized fp32 temporary per chunk, chunks of at least
1024 rows on an 80 GB device); its pieces (GEMM efficiency, occupancy, calibration) and the README renderer.
The modelled times are reported by the benchmark, never asserted against targets here."""

import json

import pytest
import torch

from benchmarks import gpu_model, report

SMALL = dict(rows=256, hs=64, ht=96, vocab=1000, vocab_size=990, dtype=torch.bfloat16)
K = dict(gpu_model.CONSTANTS)


@pytest.mark.parametrize("name", ["vgs", "standard", "liger_jsd"])
def test_model_runs_at_a_small_size(name):
    if name == "liger_jsd":
        pytest.importorskip("liger_kernel.transformers")
    c = gpu_model.model_case(name, k=K, **SMALL)
    assert c["name"] == name and c["rows"] == 256
    for key in ("modelled_ms", "gemm_floor_ms", "peak_temp_bytes", "gemm_flops", "non_gemm_bytes", "issue_bound_ms",
                "row_kernel_regs"):
        assert c[key] > 0, key
    assert c["modelled_ms"] >= c["gemm_floor_ms"] * 0.999  # GEMM time alone reaches the floor's
    assert c["chunk_rows"] >= 1 and c["row_kernel_spill_bytes"] == 0
    if name != "liger_jsd":
        assert c["weight_sized_temporaries"] == 1  # the fp32 weight-gradient accumulator only
        assert c["row_kernels"] >= 1 and c["host_syncs"] >= 1


def test_model_at_qwen_shapes_has_no_weight_sized_temporary_per_chunk():
    """B*T = 16384, V = 151936, H 2048 / 4096, bf16: one fp32 [V, H] tensor (the accumulator) for
    the whole call, chunks of >= 1024 rows on an 80 GB device, the minimal GEMMs plus corrections."""
    c = gpu_model.model_case("vgs", 16384, 2048, 4096, 151936, 151669, torch.bfloat16, K)
    assert c["weight_sized_temporaries"] == 1, c["weight_sized_allocations"]
    assert c["chunk_rows"] >= 1024
    assert c["gemm_flops_over_floor"] < 1.05


def test_gemm_efficiency_counts_waves_and_splits_k():
    # many output tiles: whole waves, no split
    eff, split = gpu_model.gemm_efficiency(2048, 151936, 4096, K)
    assert split == 1 and eff > 0.95
    # grad_h of a chunk: [1664, V] x [V, 2048] has 13 x 8 = 104 tiles on 132 SMs: split K to fill them
    eff1 = 104 / 132
    eff, split = gpu_model.gemm_efficiency(1664, 2048, 151936, K)
    assert split > 1 and eff > eff1
    # a short K cannot be split
    assert gpu_model.gemm_efficiency(1664, 2048, 1024, K)[1] == 1


def test_occupancy_from_registers():
    assert gpu_model.occupancy(79, 8, K) == 24  # 80 registers a thread: 25 warps, three 8-warp blocks
    assert gpu_model.occupancy(128, 8, K) == 16
    assert gpu_model.occupancy(255, 8, K) == 8


def test_model_main_writes_the_results_json_and_takes_a_calibration(tmp_path, capsys):
    calib = {"device": "NVIDIA H200", "dtype": "torch.bfloat16", "copy": {"gb_per_s": 4300.0},
             "gemms": [{"name": "square", "m": 8192, "n": 8192, "k": 8192, "kind": "mm", "seconds": 0.0014}],
             "calibration": {"hbm_tbps": 4.3, "gemm_tflops": {"square": 785.0}}}
    (tmp_path / "micro.json").write_text(json.dumps(calib))
    assert gpu_model.main(["--rows", "128", "--hs", "32", "--ht", "48", "--vocab", "500", "--vocab-size", "490",
                           "--cases", "vgs", "standard", "--out-dir", str(tmp_path), "--no-compile",
                           "--calibration", str(tmp_path / "micro.json")]) == 0
    doc = json.loads((tmp_path / "gpu_model.json").read_text())
    assert [c["name"] for c in doc["cases"]] == ["vgs", "standard"]
    required = {"name", "rows", "modelled_ms", "gemm_floor_ms", "chunk_rows", "peak_temp_bytes",
                "weight_sized_temporaries", "row_kernel_regs", "row_kernel_spill_bytes", "issue_bound_ms"}
    assert all(required <= set(c) for c in doc["cases"])
    assert doc["constants"]["gemm_tflops"] == 785.0 and doc["constants"]["hbm_tbps"] == 4.3
    (check,) = doc["gemm_model_check"]
    assert check["name"] == "square" and check["modelled_over_measured"] == pytest.approx(
        2 * 8192**3 / 785e12 / 0.0014, rel=0.05)
    doc["_file"] = "gpu_model.json"
    text = "\n".join(report.gpu_model_section(doc))
    assert "GEMM floor" in text


def test_report_separates_measured_and_modelled():
    doc = {"benchmark": "gpu_model", "created_utc": "x", "constants": dict(K),
           "shapes": {"dtype": "bfloat16", "vocab": 10}, "versions": {}, "_file": "gpu_model.json",
           "cases": [dict(name="vgs", rows=8, chunk_rows=4, gemm_floor_ms=1.0, modelled_ms=1.2,
                          ratio_to_gemm_floor=1.2, peak_temp_bytes=10, weight_sized_temporaries=1)]}
    text = report.render([doc])
    assert text.index("### Measured") < text.index("### Modelled") < text.index("GPU cost model")
    assert "No GPU measurements yet" in text
