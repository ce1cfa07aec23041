"""A cost model of the fused-linear loss on a GPU, run on the CPU (no GPU needed).

    python -m benchmarks.gpu_model                   # B*T in {4096, 16384}, Qwen3-VL shapes, bf16
    python -m benchmarks.gpu_model --rows 256 --hs 64 --ht 96 --vocab 1000 --no-write   # small

It runs the real host code -- ``fused_linear_vgs_loss`` forward + backward (``mode="vgs"`` and the
standard-OPD case ``mode="standard"`` without the text view) and Liger-Kernel's chunked
``LigerFusedLinearJSDLoss`` (beta = 1, the standard-OPD anchor of ``benchmarks.kernels``) -- on fake
tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data) and records every aten
op it issues:

* **GEMMs** (``mm`` / ``addmm`` and their ``out`` / ``out_dtype`` forms): FLOPs = 2 M N K, bytes =
  both operands + the output (+ the output read again when it is accumulated into);
* **row kernels** (our backend's ``rows_fn``): counted analytically from the bytes the Triton kernel
  reads and writes (pass A reads the four logit chunks, or two when the text-only pair is passed
  aliased; pass B, with gradients, reads them again and writes the gradients) and its exps;
* **everything else**: the bytes each op reads and writes (views and allocations free);
* **memory**: every storage the call allocates, alive until Python frees it; the peak of the live
  bytes above the inputs is ``peak_temp_bytes`` (what ``torch.cuda.max_memory_allocated`` would
  add, less the caching allocator's rounding); ``weight_sized_temporaries`` counts fp32 tensors
  shaped like the student weight, [V, H_student] (the weight-gradient accumulator is one).

The modelled time of each op is ``max(FLOPs / GEMM rate, bytes / HBM bandwidth)`` (GEMMs),
``max(bytes / HBM bandwidth, exps / exp rate)`` (row kernels) or ``bytes / HBM bandwidth``, plus a
launch gap, summed (one stream, no overlap). The constants (``CONSTANTS``: an H100 SXM) are printed
and stored with the results; measured numbers from a GPU run (``make gpu-check``) calibrate them.
The GEMM floor is the minimal GEMM work of the loss at the same GEMM rate (``benchmarks.kernels``'
``gemm_floor:*``): VGS 4 forward GEMMs + 2 backward GEMMs (zs) on all rows + 2 backward GEMMs (zsp)
on the gated 30 %; standard OPD 2 + 2.

Data-dependent steps on fake tensors take stated values: every token is valid (no mask), a fraction
``1 - quantile`` (30 %) of the rows is gated, scalars read back are plausible constants.
The fake tensors live on the CPU (a CPU build of torch cannot index fake CUDA tensors or run autograd
on them); ``vgs_kernels.driver.on_gpu`` and ``free_device_memory`` are substituted so that the
driver takes its CUDA paths (fp32-output tensor-core GEMMs, the chunk budget of a device with
``free_fraction`` of its memory free).

``--package-root DIR`` imports ``vgs_kernels`` from another checkout (e.g. the main branch) to model
that code; ``--name before`` writes ``benchmarks/results/gpu_model-before.json``, which later runs
show next to theirs (the "before" rows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import common as C

aten = torch.ops.aten

# An H100 SXM5 80 GB: what cuBLAS achieves on large bf16 GEMMs (peak 989 TFLOP/s dense) and what a
# streaming kernel achieves from HBM3 (peak 3.35 TB/s); MUFU exp2 throughput (16 / clock / SM at
# 1.98 GHz, 132 SMs); the gap between two dependent kernels on one stream.
CONSTANTS = dict(
    device="H100 SXM5 80 GB",
    gemm_tflops=700.0,
    hbm_tbps=3.0,
    exp_per_ns=132 * 16 * 1.98,
    launch_us=4.0,
    device_memory_gib=80.0,
    free_fraction=0.5,
)
QWEN = dict(hs=2048, ht=4096, vocab=151936, vocab_size=151669, dtype="bfloat16")
ROWS = (4096, 16384)
GATED_FRACTION = 0.3  # 1 - quantile 0.7
# Rows whose gate the driver's running-quantile prediction gets wrong (corrected in pass 2): stated
# (the iid estimate at 10 chunks of 1664 rows is ~0.6 %; see measure_fixup_fraction for a CPU run)
FIXUP_FRACTION = 0.02
LIGER_CHUNK = 1024  # LigerFusedLinearJSDLoss's default chunk_size


# ----------------------------------------------------------------------------- recording
@dataclasses.dataclass
class Tally:
    gemm_flops: float = 0.0
    gemm_bytes: float = 0.0
    gemm_s: float = 0.0
    gemms: int = 0
    rows_bytes: float = 0.0
    rows_exps: float = 0.0
    rows_s: float = 0.0
    row_kernels: int = 0
    other_bytes: float = 0.0
    other_s: float = 0.0
    other_kernels: int = 0
    live: int = 0
    peak: int = 0
    allocs: int = 0
    weight_sized: list = dataclasses.field(default_factory=list)  # (dtype, shape, op)
    chunk_rows: list = dataclasses.field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.rows_s + self.other_s


_GEMMS = {
    aten.mm.default: "mm", aten.mm.out: "mm", aten.mm.dtype: "mm", aten.mm.dtype_out: "mm",
    aten.addmm.default: "addmm", aten.addmm.out: "addmm", aten.addmm.dtype: "addmm",
    aten.addmm.dtype_out: "addmm", aten.addmm_.default: "addmm",
}
_FREE = {  # allocation or metadata only: no kernel, no traffic
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default,
    aten.lift_fresh.default, aten.detach.default, aten.t.default, aten.alias.default,
    aten._unsafe_view.default, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
}
_WRITE_ONLY_FIRST = {aten.copy_.default, aten.zero_.default, aten.fill_.Scalar, aten.fill_.Tensor}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(x):
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


class CostMode(TorchDispatchMode):
    """Records the ops of a call on fake tensors (see the module doc); answers the data-dependent ones."""

    def __init__(self, k: dict, n_valid: int, weight_shape: tuple[int, int], gated_fraction: float):
        super().__init__()
        # weight-sized: [~V, H_student] (or transposed), V within 10 % (a head sliced to vocab_size)
        self.k, self.n_valid, self.weight_shape, self.gated = k, n_valid, weight_shape, gated_fraction
        self.t = Tally()
        self._seen: set[int] = set()
        self._any_outputs: set[int] = set()  # ids of live outputs of aten.any.dim (the gated-row flags)

    # -- memory
    def _track(self, func, out, inputs) -> None:
        in_storages = {id(t.untyped_storage()) for t in inputs}
        for t in _tensors(out):
            st = t.untyped_storage()
            key = id(st)
            if key in in_storages or key in self._seen:
                continue
            nbytes = st.nbytes()
            self._seen.add(key)
            self.t.live += nbytes
            self.t.allocs += 1
            self.t.peak = max(self.t.peak, self.t.live)
            if t.dim() == 2 and self.weight_shape[1] in t.shape and max(t.shape) >= 0.9 * self.weight_shape[0]:
                self.t.weight_sized.append((str(t.dtype).replace("torch.", ""), tuple(t.shape), str(func)))
            weakref.finalize(st, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.t.live -= nbytes

    # -- time
    def _gemm(self, func, args, kwargs, out) -> None:
        kind = _GEMMS[func]
        a, b = (args[0], args[1]) if kind == "mm" else (args[1], args[2])
        m, kk = a.shape
        n = b.shape[1]
        res = kwargs.get("out", out if isinstance(out, torch.Tensor) else None)
        if func is aten.addmm_.default:
            res = args[0]
        flops = 2.0 * m * n * kk
        nbytes = _nbytes(a) + _nbytes(b) + m * n * res.element_size()
        if kind == "addmm" and kwargs.get("beta", 1) != 0:
            nbytes += _nbytes(args[0])
        self.t.gemm_flops += flops
        self.t.gemm_bytes += nbytes
        self.t.gemm_s += max(flops / (self.k["gemm_tflops"] * 1e12), nbytes / (self.k["hbm_tbps"] * 1e12))
        self.t.gemm_s += self.k["launch_us"] * 1e-6
        self.t.gemms += 1

    def _other(self, func, args, kwargs, out) -> None:
        if func in _FREE or func.is_view or str(func).startswith("prim."):
            return
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        if func in (aten.index_select.default, aten.index.Tensor, aten.gather.default):
            read = sum(_nbytes(t) for t in outs) + sum(_nbytes(t) for t in ins[1:])
        elif func in (aten.index_add_.default, aten.index_copy_.default):
            src = args[3]
            read, outs = 2 * _nbytes(src) + _nbytes(args[2]), []
            self._add_other(read + _nbytes(src))
            return
        else:
            skip = set()
            if func in _WRITE_ONLY_FIRST:
                skip.add(id(args[0]))
            if "out" in kwargs:
                skip.add(id(kwargs["out"]))
            read = sum(_nbytes(t) for t in ins if id(t) not in skip)
        self._add_other(read + sum(_nbytes(t) for t in outs))

    def _add_other(self, nbytes: float) -> None:
        self.t.other_bytes += nbytes
        self.t.other_s += nbytes / (self.k["hbm_tbps"] * 1e12) + self.k["launch_us"] * 1e-6
        self.t.other_kernels += 1

    def row_kernel(self, nbytes: float, exps: float) -> None:
        self.t.rows_bytes += nbytes
        self.t.rows_exps += exps
        self.t.rows_s += max(nbytes / (self.k["hbm_tbps"] * 1e12), exps / (self.k["exp_per_ns"] * 1e9))
        self.t.rows_s += self.k["launch_us"] * 1e-6
        self.t.row_kernels += 1

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:  # .item(), .tolist(), bool(): plausible constants
            x = args[0]
            return True if x.dtype == torch.bool else (0.5 if x.is_floating_point() else self.n_valid)
        if func is aten.nonzero.default:  # every token valid; the gated rows a fraction of the rest
            x = args[0]
            n = round(self.gated * x.numel()) if id(x) in self._any_outputs else x.numel()
            return torch.empty(n, x.dim(), dtype=torch.long, device=x.device)
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            x, (m,) = args[0], args[1]  # x[mask] with an all-True mask
            out = torch.empty((m.numel(), *x.shape[m.dim():]), dtype=x.dtype, device=x.device)
            self._other(aten.index.Tensor, (x, [None]), {}, out)
            return out
        if func is aten.addmm.dtype_out:  # no fake kernel for the out= form: shapes are the out's
            out = kwargs["out"]
            self._gemm(func, args, kwargs, out)
            return out
        out = func(*args, **kwargs)
        if func in _GEMMS:
            self._gemm(func, args, kwargs, out)
        else:
            self._other(func, args, kwargs, out)
        if func is aten.any.dim:
            self._any_outputs.add(id(out))
            weakref.finalize(out, self._any_outputs.discard, id(out))
        self._track(func, out, _tensors((args, kwargs)))
        return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.untyped_storage() is b.untyped_storage() and a.storage_offset() == b.storage_offset())


def analytic_rows(mode: CostMode):
    """A row function following the row contract that does no math: it reports the bytes and exps
    of the Triton kernel to ``mode`` and returns [n, 4] stats (shapes only)."""

    def rows_fn(zs, zsp, zt, ztp, coef, *, temperature, detach_target_prior, grad_zs=None, grad_zsp=None,
                vocab=None):
        n, width = zs.shape
        v = width if vocab is None else vocab
        two = _same(zs, zsp) and _same(zt, ztp)
        item = zs.element_size()
        streams = 2 if two else 4
        nbytes = n * v * item * streams  # pass A
        exps = 5.0 * n * v
        if grad_zs is not None or grad_zsp is not None:
            prior = grad_zsp is not None and not detach_target_prior
            reread = 2 if two or (grad_zs is None and not prior) else 4
            nbytes += n * v * item * reread
            for g in (grad_zs, grad_zsp):
                if g is not None:
                    nbytes += n * width * g.element_size()
            exps += n * v * ((grad_zs is not None) + (grad_zsp is not None) + prior)
        mode.row_kernel(nbytes, exps)
        return torch.empty(n, 4, device=zs.device)

    return rows_fn


# ----------------------------------------------------------------------------- cases
def gemm_floor_flops(kind: str, n: int, hs: int, ht: int, v: int) -> float:
    """The minimal GEMM FLOPs of one fwd+bwd (as benchmarks.kernels' gemm_floor:vgs / :opd)."""
    if kind == "vgs":
        return 2 * n * v * (2 * hs + 2 * ht) + 4 * n * v * hs + 4 * round(GATED_FRACTION * n) * v * hs
    return 2 * n * v * (hs + ht) + 4 * n * v * hs


@contextlib.contextmanager
def _patched(obj, name, value):
    had = hasattr(obj, name)
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _gpu_patches(stack: contextlib.ExitStack, k: dict, mode: CostMode, tally: Tally) -> None:
    """Make vgs_kernels take its CUDA paths on the fake CPU tensors, with the analytic row kernel."""
    driver = importlib.import_module("vgs_kernels.driver")
    loss = importlib.import_module("vgs_kernels.loss")
    registry = importlib.import_module("vgs_kernels.backends")
    free = int(k["device_memory_gib"] * k["free_fraction"] * 2**30)
    triton_be = registry._load("triton")
    if isinstance(triton_be, str):  # no triton here: the same chunking, our analytic kernel
        triton_be = registry.Backend("triton", None, ("cuda",))
    model_be = dataclasses.replace(triton_be, rows_fn=analytic_rows(mode), devices=("cpu", "cuda"))
    stack.enter_context(_patched(loss, "resolve", lambda name, device: model_be))
    real_chunk = driver.default_chunk_size

    if hasattr(driver, "on_gpu"):
        stack.enter_context(_patched(driver, "on_gpu", lambda x: True))
        stack.enter_context(_patched(driver, "free_device_memory", lambda device: free))
        if hasattr(driver, "predicted_rows"):  # predicted gate: 30 % predicted, FIXUP_FRACTION corrected
            stack.enter_context(_patched(driver, "predicted_rows", lambda vds, theta: _first(vds, GATED_FRACTION)))
            stack.enter_context(_patched(driver, "gated_rows", lambda coef: _first(coef, FIXUP_FRACTION)))

        def chunk(*a, **kw):
            rows = real_chunk(*a, **kw)
            tally.chunk_rows.append(rows)
            return rows
    else:  # an older driver (the "before" run): its CUDA branches keyed on the device
        stack.enter_context(_patched(torch.cuda, "mem_get_info", lambda device=None: (free, free * 2)))
        real_mm = driver.mm_fp32

        def mm_fp32(a, b):
            if b.dtype in (torch.bfloat16, torch.float16):
                return driver._mm_low_precision_fp32_out(a.to(b.dtype), b)
            return real_mm(a, b)

        stack.enter_context(_patched(driver, "mm_fp32", mm_fp32))

        def chunk(n, vocab, device, *a, **kw):
            rows = real_chunk(n, vocab, torch.device("cuda"), *a, **kw)
            tally.chunk_rows.append(rows)
            return rows
    stack.enter_context(_patched(loss, "default_chunk_size", chunk))


def _first(x: torch.Tensor, fraction: float) -> torch.Tensor:
    return torch.arange(round(fraction * x.shape[0]), device=x.device)


def model_case(name: str, rows: int, hs: int, ht: int, vocab: int, vocab_size: int | None, dtype: torch.dtype,
               k: dict) -> dict:
    """Run one case on fake tensors; its counts, modelled time and peak temporaries."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = CostMode(k, rows, (vocab, hs), GATED_FRACTION)
    with FakeTensorMode(), contextlib.ExitStack() as stack:
        hs_ = torch.empty(rows, hs, dtype=dtype, requires_grad=True)
        ws = torch.empty(vocab, hs, dtype=dtype, requires_grad=True)
        ht_ = torch.empty(rows, ht, dtype=dtype)
        wt = torch.empty(vocab, ht, dtype=dtype)
        if name == "liger_jsd":
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, temperature=1.0,
                                         compiled=False, chunk_size=LIGER_CHUNK)
            labels = torch.zeros(rows, dtype=torch.long)
            mode.t.chunk_rows.append(LIGER_CHUNK)
            with mode:
                fn(hs_, ws, ht_, wt, labels).backward()
        else:
            from vgs_kernels import fused_linear_vgs_loss

            _gpu_patches(stack, k, mode, mode.t)
            if name == "vgs":
                hsp = torch.empty(rows, hs, dtype=dtype, requires_grad=True)
                htp = torch.empty(rows, ht, dtype=dtype)
            else:
                hsp = htp = None
            with mode:
                out = fused_linear_vgs_loss(hs_, hsp, ws, ht_, htp, wt, mode="vgs" if name == "vgs" else "standard",
                                            vocab_size=vocab_size)
                out.loss.backward()
                del out
    t = mode.t
    floor = gemm_floor_flops("vgs" if name == "vgs" else "opd", rows, hs, ht, vocab)
    floor_s = floor / (k["gemm_tflops"] * 1e12)
    fp32_weight = [w for w in t.weight_sized if w[0] == "float32"]
    return {
        "name": name, "rows": rows, "hidden_student": hs, "hidden_teacher": ht, "vocab": vocab,
        "vocab_size": vocab_size, "dtype": str(dtype).replace("torch.", ""),
        "chunk_rows": max(t.chunk_rows) if t.chunk_rows else None,
        "chunks": math.ceil(rows / max(t.chunk_rows)) if t.chunk_rows else None,
        "modelled_ms": 1e3 * t.total_s, "gemm_floor_ms": 1e3 * floor_s, "ratio_to_gemm_floor": t.total_s / floor_s,
        "gemm_ms": 1e3 * t.gemm_s, "gemm_flops": t.gemm_flops, "gemm_floor_flops": floor, "gemms": t.gemms,
        "gemm_flops_over_floor": t.gemm_flops / floor,
        "row_kernel_ms": 1e3 * t.rows_s, "row_kernel_bytes": t.rows_bytes, "row_kernels": t.row_kernels,
        "other_ms": 1e3 * t.other_s, "other_bytes": t.other_bytes, "other_kernels": t.other_kernels,
        "non_gemm_bytes": t.rows_bytes + t.other_bytes,
        "peak_temp_bytes": t.peak, "allocations": t.allocs,
        "weight_sized_temporaries": len(fp32_weight),
        "weight_sized_allocations": _count(t.weight_sized),
    }


def _count(items) -> list[dict]:
    out: dict = {}
    for dt, shape, op in items:
        key = (dt, shape, op)
        out[key] = out.get(key, 0) + 1
    return [{"dtype": d, "shape": list(s), "op": o, "count": c} for (d, s, o), c in out.items()]


# ----------------------------------------------------------------------------- output
def table(cases: list[dict], before: list[dict] | None = None) -> str:
    liger = {c["rows"]: c for c in cases if c["name"] == "liger_jsd"}
    rows = []
    for tag, group in (("", cases), ("before: ", before or [])):
        for c in group:
            lg = liger.get(c["rows"])
            rows.append([
                f"{tag}{c['name']}", str(c["rows"]), str(c["chunk_rows"]), f"{c['gemm_flops'] / 1e12:.1f}",
                f"{c['non_gemm_bytes'] / 1e9:.1f}", f"{c['gemm_floor_ms']:.1f}", f"{c['modelled_ms']:.1f}",
                f"{c['ratio_to_gemm_floor']:.2f}x", C.fmt_bytes(c["peak_temp_bytes"]),
                "-" if lg is None or c["name"] == "liger_jsd" else f"{c['peak_temp_bytes'] / lg['peak_temp_bytes']:.2f}x",
                str(c["weight_sized_temporaries"]),
            ])
    return C.table(rows, ["case", "B*T", "chunk rows", "GEMM TFLOP", "non-GEMM GB", "GEMM floor ms",
                          "modelled ms", "modelled / floor", "peak temporaries", "peak / Liger",
                          "fp32 [V, H] tensors"])


def run(args) -> dict:
    k = dict(CONSTANTS)
    for key in ("gemm_tflops", "hbm_tbps", "launch_us", "device_memory_gib", "free_fraction"):
        if getattr(args, key, None) is not None:
            k[key] = getattr(args, key)
    dtype = getattr(torch, args.dtype)
    vocab_size = args.vocab_size if args.vocab_size and args.vocab_size < args.vocab else None
    cases = []
    for rows in args.rows:
        for name in args.cases:
            t0 = time.perf_counter()
            try:
                c = model_case(name, rows, args.hs, args.ht, args.vocab, vocab_size, dtype, k)
            except ImportError as exc:
                print(f"# {name}: skipped ({exc})", flush=True)
                continue
            c["trace_s"] = time.perf_counter() - t0
            cases.append(c)
            print(f"  {name:10s} B*T={rows:6d} chunk={c['chunk_rows']}  modelled {c['modelled_ms']:8.1f} ms  "
                  f"floor {c['gemm_floor_ms']:7.1f} ms  ({c['ratio_to_gemm_floor']:.2f}x)  "
                  f"peak {C.fmt_bytes(c['peak_temp_bytes'])}  fp32 [V,H] tensors {c['weight_sized_temporaries']}",
                  flush=True)
    import vgs_kernels

    root = Path(vgs_kernels.__file__).resolve().parent.parent
    versions = C.versions()
    # the modelled code's commit (+dirty only for uncommitted changes under vgs_kernels/)
    versions["git_commit"] = _git_commit(root)
    return {
        "benchmark": "gpu_model",
        "schema_version": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_model", *sys.argv[1:]]),
        "versions": versions,
        "package_root": str(root),
        "package_git_commit": _git_commit(root),
        "constants": k,
        "assumptions": {
            "gated_fraction": GATED_FRACTION, "mask": "all tokens valid",
            "fixup_fraction": FIXUP_FRACTION,
            "liger": f"LigerFusedLinearJSDLoss(beta=1, compiled=False, chunk_size={LIGER_CHUNK}) traced eagerly: its "
                     "elementwise ops are counted unfused (torch.compile would fuse them)",
            "row_kernels": "analytic bytes/exps of the Triton row kernel",
        },
        "shapes": {"rows": list(args.rows), "hidden_student": args.hs, "hidden_teacher": args.ht,
                   "vocab": args.vocab, "vocab_size": vocab_size, "dtype": args.dtype},
        "cases": cases,
    }


def _git_commit(path: Path) -> str | None:
    """The checkout's commit, +dirty when its vgs_kernels/ has uncommitted changes."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "vgs_kernels"],
                               cwd=path, capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="B*T values")
    p.add_argument("--hs", type=int, default=QWEN["hs"])
    p.add_argument("--ht", type=int, default=QWEN["ht"])
    p.add_argument("--vocab", type=int, default=QWEN["vocab"], help="lm_head rows")
    p.add_argument("--vocab-size", type=int, default=QWEN["vocab_size"], help="tokenizer ids (vocab_size=)")
    p.add_argument("--dtype", default=QWEN["dtype"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--cases", nargs="+", default=["vgs", "standard", "liger_jsd"],
                   choices=["vgs", "standard", "liger_jsd"])
    for key in ("gemm_tflops", "hbm_tbps", "launch_us", "device_memory_gib", "free_fraction"):
        p.add_argument("--" + key.replace("_", "-"), type=float, help=f"default {CONSTANTS[key]}")
    p.add_argument("--package-root", help="import vgs_kernels from this checkout (e.g. the main branch)")
    p.add_argument("--name", default="gpu_model", help="results file stem (gpu_model-before: the 'before' rows)")
    p.add_argument("--out-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.package_root:
        sys.path.insert(0, str(Path(args.package_root).resolve()))
        for mod in [m for m in sys.modules if m == "vgs_kernels" or m.startswith("vgs_kernels.")]:
            del sys.modules[mod]
    print("# GPU cost model: " + ", ".join(f"{k}={v}" for k, v in CONSTANTS.items()), flush=True)
    doc = run(args)
    out_dir = Path(args.out_dir)
    before_path = out_dir / "gpu_model-before.json"
    before = None
    if args.name != "gpu_model-before" and before_path.exists():
        import json

        prev = json.loads(before_path.read_text())
        before = prev.get("cases")
        doc["before"] = {"file": before_path.name, "package_root": prev.get("package_root"),
                         "git_commit": prev.get("package_git_commit"), "cases": before}
    text = table(doc["cases"], before)
    print(text, flush=True)
    doc["table_markdown"] = text
    if not args.no_write:
        path = C.write_json(out_dir / f"{args.name}.json", doc)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
