"""The compiled `cpu` row kernel (vgs_kernels._C) against the chunked `torch` backend and `reference`.

    python -m benchmarks.cpu_rows [--repeats 5] [--min-repeats 5] [--quick] [--no-reference] [--no-loss]

Two measurements per shape (fp32 logits, all rows valid):

* ``rows``: the row kernel alone, as pass 1 of the driver runs it: the [N, V] rows in chunks (the
  same chunk size for both backends), per chunk a fresh pair of fp32 gradient buffers and one call
  computing the four KLs and both logit gradients (``detach_target_prior=False``, all three
  coefficients non-zero: the heaviest path). Backends ``cpu`` and ``torch``.
* ``vgs_loss``: the public ``vgs_loss`` forward + backward (mode ``vgs``, defaults otherwise) with
  ``backend`` = ``cpu``, ``torch`` and ``reference``: driver, gate pass and gradient scatter included.

Times are medians of ``n`` timed calls (after a warm-up on a small shape): ``--repeats`` of them,
or fewer, but at least ``--min-repeats``, once ``--budget-s`` seconds have passed; ``n`` is in every
result and in the printed table. Peak memory is ``benchmarks.common.peak_memory``: the peak of the
running sum of c10 CPU-allocator allocations minus frees made on the calling thread during one call
(PyTorch profiler events), i.e. the bytes the call held on top of its inputs.
Results go to ``benchmarks/results/cpu_rows-cpu.json``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from vgs_kernels import backends, vgs_loss
from vgs_kernels.backends import is_available, resolve

from . import common

SHAPES = [(4096, 32000), (1024, 151936)]
QUICK_SHAPES = [(256, 32000), (64, 151936)]
CHUNK_BUDGET = 256 * 2**20  # bytes: rows per chunk = budget // (V * 4 B * 16 temporaries), as the
# driver sizes chunks for the torch backend on CPU


def _inputs(n: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(n, v, generator=g) * 2.0 for _ in range(4)]
    coef = torch.rand(n, 3, generator=g) / n
    return z, coef


def rows_call(rows_fn, z, coef, chunk: int):
    n, v = z[0].shape

    def run():
        stats = torch.empty(n, 4)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            g_s = torch.empty(b - a, v)
            g_sp = torch.empty(b - a, v)
            stats[a:b] = rows_fn(*(x[a:b] for x in z), coef[a:b], temperature=1.0,
                                 detach_target_prior=False, grad_zs=g_s, grad_zsp=g_sp)
            del g_s, g_sp
        return stats

    return run


def loss_call(backend: str, z):
    def run():
        zs, zsp = (x.detach().requires_grad_() for x in z[:2])
        out = vgs_loss(zs, zsp, z[2], z[3], backend=backend)
        out.loss.backward()

    return run


def _measure(fn, args, device) -> dict:
    t = common.time_fn(fn, None, device, warmup=0, repeats=args.repeats,
                       min_repeats=min(args.min_repeats, args.repeats), budget_s=args.budget_s)
    m = common.peak_memory(fn, None, device)
    common.free_memory(device)
    return {**t, **m}


def _reference(z, n: int, args, device) -> dict:
    """The materialised reference needs ~40 fp32 [N, V] buffers: it runs on all N rows only when its
    projected peak (measured on N/8 rows, scaled linearly) stays under half the available memory;
    otherwise the N/8-row measurement is reported with time and memory scaled by 8, and says so."""
    sub = max(1, n // 8)
    part = _measure(loss_call("reference", [x[:sub] for x in z]), args, device)
    projected = part["peak_bytes"] * n / sub
    avail = common.meminfo("MemAvailable") or 0
    if projected < 0.5 * avail:
        return _measure(loss_call("reference", z), args, device)
    k = n / sub
    return {"median_s": part["median_s"] * k, "peak_bytes": int(part["peak_bytes"] * k), "n": part["n"],
            "measured_rows": sub, "measured": part,
            "note": f"measured on {sub} of {n} rows and scaled x{k:g}: the full run would need "
                    f"~{common.fmt_bytes(projected)} of {common.fmt_bytes(avail)} available"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default %(default)s)")
    p.add_argument("--min-repeats", type=int, default=None,
                   help="timed calls before --budget-s may stop a measurement (default 5; --quick 1)")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop repeating after this many seconds "
                   "(once --min-repeats calls are done)")
    p.add_argument("--quick", action="store_true", help="smaller N (a smoke run)")
    p.add_argument("--no-reference", action="store_true", help="skip the materialised reference")
    p.add_argument("--no-loss", action="store_true", help="only the row kernels")
    p.add_argument("--note", action="append")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "cpu_rows-cpu.json"))
    args = p.parse_args(argv)
    if args.min_repeats is None:
        args.min_repeats = 1 if args.quick else 5

    status = backends()["cpu"]
    if not is_available(status):
        print(f"cpu backend {status}; build it with `pip install --no-build-isolation -e .`", file=sys.stderr)
        return 1
    device = torch.device("cpu")
    from vgs_kernels.backends import extension

    result = common.header(device, args, "cpu_rows")
    result["extension"] = {"cpu_isa": extension.CPU_ISA, "with_cuda": extension.WITH_CUDA}
    result["memory_method"] = common.CPU_MEMORY_METHOD
    result["dtype"] = "float32"
    result["timing"] = {"repeats": args.repeats, "min_repeats": min(args.min_repeats, args.repeats),
                        "budget_s": args.budget_s, "statistic": "median of n timed calls ('n' in every result)"}
    result["cases"] = []
    cpu_rows, torch_rows = resolve("cpu", device).rows_fn, resolve("torch", device).rows_fn

    # warm-up (thread pool, first-call costs) on a small shape
    zw, cw = _inputs(64, 4096)
    for fn in (cpu_rows, torch_rows):
        rows_call(fn, zw, cw, 16)()
    for be in ("cpu", "torch", "reference"):
        loss_call(be, zw)()

    lines = []
    for n, v in QUICK_SHAPES if args.quick else SHAPES:
        z, coef = _inputs(n, v)
        chunk = max(1, min(n, CHUNK_BUDGET // (v * 4 * 16)))
        case = {"N": n, "V": v, "chunk_rows": chunk, "input_bytes": 4 * n * v * 4, "rows": {}, "vgs_loss": {}}
        for name, fn in (("cpu", cpu_rows), ("torch", torch_rows)):
            case["rows"][name] = r = _measure(rows_call(fn, z, coef, chunk), args, device)
            print(f"N={n} V={v} rows     {name:9s} {common.fmt_time(r['median_s']):>9s} (n={r['n']})  "
                  f"peak {common.fmt_bytes(r['peak_bytes'])}", flush=True)
        if not args.no_loss:
            for be in ("cpu", "torch"):
                case["vgs_loss"][be] = r = _measure(loss_call(be, z), args, device)
                print(f"N={n} V={v} vgs_loss {be:9s} {common.fmt_time(r['median_s']):>9s} (n={r['n']})  "
                      f"peak {common.fmt_bytes(r['peak_bytes'])}", flush=True)
            if not args.no_reference:
                case["vgs_loss"]["reference"] = r = _reference(z, n, args, device)
                print(f"N={n} V={v} vgs_loss reference {common.fmt_time(r['median_s']):>9s} (n={r['n']})  "
                      f"peak {common.fmt_bytes(r['peak_bytes'])}{'  (' + r['note'] + ')' if 'note' in r else ''}",
                      flush=True)
        rt = case["rows"]
        case["rows_speedup_cpu_vs_torch"] = rt["torch"]["median_s"] / rt["cpu"]["median_s"]
        lt = case["vgs_loss"]
        for other in ("torch", "reference"):
            if "median_s" in lt.get(other, {}) and "median_s" in lt.get("cpu", {}):
                case[f"vgs_loss_speedup_cpu_vs_{other}"] = lt[other]["median_s"] / lt["cpu"]["median_s"]
        result["cases"].append(case)
        del z, coef
        common.free_memory(device)
        for kind, table in (("rows", rt), ("vgs_loss", lt)):
            for be, r in table.items():
                lines.append([f"{n} x {v}", kind, be, common.fmt_time_n(r.get("median_s"), common.repeats_of(r)),
                              common.fmt_bytes(r.get("peak_bytes")),
                              common.fmt_ratio(r["median_s"] / table["cpu"]["median_s"])
                              if "median_s" in r and "median_s" in table.get("cpu", {}) else "-"])

    result["machine_state_end"] = common.machine_state()
    path = common.write_json(common.Path(args.out), result)
    print()
    print(common.table(lines, ["N x V (fp32)", "what", "backend", "median time (n)", "peak memory",
                               "time / cpu"]))
    print(f"\ncpu kernel: {extension.CPU_ISA}, {torch.get_num_threads()} threads; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
