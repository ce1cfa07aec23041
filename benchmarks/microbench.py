"""The device's own ceilings, measured independently of the loss: GEMM rates at the loss's shapes and the
copy bandwidth. ``benchmarks.gpu_model --calibration`` reads them (never the time of the kernels it models).

    python -m benchmarks.microbench [--device cuda] [--json microbench.json]
    python -m benchmarks.microbench --device cpu --small        # a CPU smoke run (tests)

GEMMs (bf16 operands, fp32 accumulation, cuBLAS through torch; ``c`` chunk rows, ``V`` lm_head rows):

* ``forward``  [c, H] x [H, V] -> [c, V] bf16        (the four logit GEMMs)
* ``grad_h``   [c, V] x [V, H] -> [c, H] fp32        (hidden-state gradient: a small output, long K)
* ``grad_w``   [V, c] x [c, H] += [V, H] fp32        (weight gradient into the fp32 accumulator, in place)
* ``grad_w_small``  the same with c = 512 rows       (the predicted-gated text rows of a chunk)

each at H = 2048 and 4096, c = the driver's chunk (1664 rows at Qwen shapes) and V = 151936, plus a square
8192^3 product (the datasheet-like rate) and a device-to-device copy of 2 GiB (bytes read + written). Each
figure is the median of repeated timed runs (CUDA events after warm-up), on random data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _time(fn, device, warmup=2, repeats=7) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_cases(c: int, v: int, hs: list[int], small_rows: int) -> list[dict]:
    out = [{"name": "square", "m": 8192, "n": 8192, "k": 8192, "kind": "mm"}]
    for h in hs:
        out += [{"name": f"forward_h{h}", "m": c, "n": v, "k": h, "kind": "mm"},
                {"name": f"grad_h_h{h}", "m": c, "n": h, "k": v, "kind": "mm_fp32_out"},
                {"name": f"grad_w_h{h}", "m": v, "n": h, "k": c, "kind": "addmm_fp32_acc"},
                {"name": f"grad_w_small_h{h}", "m": v, "n": h, "k": small_rows, "kind": "addmm_fp32_acc"}]
    return out


def run_gemm(case: dict, device, dtype) -> dict:
    from vgs_kernels.gemm import accumulate_mm, mm_fp32

    g = torch.Generator(device=device).manual_seed(0)
    m, n, k = case["m"], case["n"], case["k"]
    if case["kind"] == "addmm_fp32_acc":  # a^T stored as [k, m] like the driver's logit gradient
        a = torch.randn(k, m, generator=g, device=device).to(dtype).t()
        b = torch.randn(k, n, generator=g, device=device).to(dtype)
        acc = torch.zeros(m, n, device=device)

        def fn():
            accumulate_mm(acc, a, b, 1.0)
        moved = (m * k + k * n) * a.element_size() + 2 * m * n * 4
    else:
        a = torch.randn(m, k, generator=g, device=device).to(dtype)
        b = torch.randn(k, n, generator=g, device=device).to(dtype)
        if case["kind"] == "mm":
            out = torch.empty(m, n, device=device, dtype=dtype)

            def fn():
                torch.mm(a, b, out=out)
            moved = (m * k + k * n + m * n) * a.element_size()
        else:
            def fn():
                mm_fp32(a, b)
            moved = (m * k + k * n) * a.element_size() + m * n * 4
    s = _time(fn, device)
    flops = 2.0 * m * n * k
    return {**case, "seconds": s, "tflops": flops / s / 1e12, "gb_per_s": moved / s / 1e9}


def run_copy(device, nbytes: int) -> dict:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    s = _time(lambda: dst.copy_(src), device)
    return {"name": "copy", "bytes": 2 * nbytes, "seconds": s, "gb_per_s": 2 * nbytes / s / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.microbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small shapes (a CPU smoke run)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.small:
        cases = gemm_cases(64, 1000, [32, 64], 16)
        cases[0].update(m=256, n=256, k=256)
        copy_bytes = 1 << 22
    else:
        cases = gemm_cases(1664, 151936, [2048, 4096], 512)
        copy_bytes = 1 << 31
    rows = []
    for case in cases:
        r = run_gemm(case, device, dtype)
        rows.append(r)
        print(f"{r['name']:22s} m={r['m']:6d} n={r['n']:6d} k={r['k']:6d}  {1e3 * r['seconds']:8.3f} ms  "
              f"{r['tflops']:7.1f} TFLOP/s  {r['gb_per_s']:7.0f} GB/s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cp = run_copy(device, copy_bytes)
    print(f"copy {copy_bytes / 2**30:.2f} GiB: {1e3 * cp['seconds']:.3f} ms, {cp['gb_per_s']:.0f} GB/s "
          "(read + written)", flush=True)
    doc = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": str(dtype),
           "torch": torch.__version__, "gemms": rows, "copy": cp,
           "calibration": {"hbm_tbps": cp["gb_per_s"] / 1e3,
                           "gemm_tflops": {r["name"]: r["tflops"] for r in rows}}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
