"""The row kernels alone on a Qwen chunk (CUDA): the pass-1 call with both gradients written in place.

    python -m benchmarks.row_kernels [--rows 1664] [--json row_kernels.json]

Times ``rows_fn(zs, zsp, zt, ztp, coef, grad_zs=zs, grad_zsp=zsp)`` on [rows, 151936] bf16 logits
(vocab_size 151669) for the ``cuda`` kernel and the ``triton`` kernel at its default tile and at every tile
``benchmarks.sass`` checks (``SWEEP``); reports the time and the bytes moved per second (pass A reads four
rows, pass B reads four and writes two). Any error or out-of-memory exits 1 (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.row_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1664)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--vocab-size", type=int, default=151669)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from vgs_kernels.backends import resolve, triton_rows

    from .sass import SWEEP

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    base = [torch.randn(args.rows, args.vocab, generator=g, device=dev).mul_(3).to(torch.bfloat16) for _ in range(4)]
    work = [b.clone() for b in base]
    coef = torch.rand(args.rows, 3, device=dev, generator=g) / args.rows
    moved = args.rows * args.vocab_size * 2 * 8 + args.rows * args.vocab * 2 * 2
    results, failed = [], 0
    configs = {"triton": [None] + [(32 * w, e, w) for e, w in SWEEP], "cuda": [None]}
    for name, cfgs in configs.items():
        for cfg in cfgs:
            label = name + ("" if cfg is None else f" {cfg[1]}x{cfg[0]} threads")
            try:
                fn = resolve(name, dev).rows_fn
                triton_rows.CONFIG_OVERRIDE = cfg
                times = []
                for i in range(6):
                    for w, b in zip(work, base):
                        w.copy_(b)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(*work, coef, temperature=1.0, detach_target_prior=True, grad_zs=work[0], grad_zsp=work[1],
                       vocab=args.vocab_size)
                    end.record()
                    end.synchronize()
                    if i:  # the first call compiles / warms up
                        times.append(start.elapsed_time(end) / 1e3)
                ms = 1e3 * statistics.median(times)
                results.append({"kernel": name, "config": cfg, "status": "ok", "median_ms": ms,
                                "gb_per_s": moved / ms / 1e6, "n": len(times)})
                print(f"  {label:34s} {ms:8.3f} ms  {moved / ms / 1e6:8.0f} GB/s", flush=True)
            except Exception as exc:  # noqa: BLE001 -- recorded, and the run fails
                failed += 1
                oom = isinstance(exc, torch.cuda.OutOfMemoryError)
                results.append({"kernel": name, "config": cfg, "status": "oom" if oom else "error",
                                "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"  {label:34s} {'OOM' if oom else 'ERROR'}: {exc}", flush=True)
            finally:
                triton_rows.CONFIG_OVERRIDE = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "vocab": args.vocab, "vocab_size": args.vocab_size, "bytes_moved": moved,
                       "results": results, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
