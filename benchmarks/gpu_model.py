"""A cost model of the fused-linear loss on a GPU, run on the CPU (no GPU needed).

    python -m benchmarks.gpu_model                   # B*T in {4096, 16384}, Qwen3-VL shapes, bf16
    python -m benchmarks.gpu_model --calibration microbench.json   # constants measured on a GPU
    python -m benchmarks.gpu_model --rows 256 --hs 64 --ht 96 --vocab 1000 --no-write   # small

It runs the real host code on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no
data) and records every aten op it issues, for three cases:

* ``vgs``: ``fused_linear_vgs_loss(mode="vgs")`` forward + backward, the four views;
* ``standard``: the same in ``mode="standard"`` without the text view (standard OPD, reverse KL);
* ``liger_jsd``: Liger-Kernel's ``LigerFusedLinearJSD`` with ``jsd_beta=1`` (reverse KL), as it runs on a
  Hopper GPU by default: its chunking (``ceil(V / H)`` chunks), fp32-output logit GEMMs, its eager PyTorch
  ops (log-softmax, softmax, the dx reduction: one kernel each, as they launch) and its Triton JSD kernel
  (counted like ours, below). The like-for-like pair is ``standard`` against ``liger_jsd``; ``vgs`` is shown
  beside both.

The vgs_kernels cases run on fake CPU tensors inside ``vgs_kernels.hooks.simulate_gpu`` (the driver takes
its CUDA paths: fp32-output GEMMs, the in-place fp32 accumulation, the chunk budget of a device with
``free_fraction`` of its memory free) with an analytic row function passed as ``backend=`` (a
``vgs_kernels.backends.Backend``); chunk sizes come from the driver's ``"chunk"`` events. The Liger case
needs two stand-ins inside Liger (its fp32-output projection, which it takes only for CUDA tensors, and its
JSD dispatch, a Triton kernel): both are stated in the JSON's assumptions.

Time of each op, summed on one stream (no overlap), each op also paying a launch gap:

* **GEMMs**: ``max(FLOPs / (peak * efficiency), bytes / bandwidth)``; efficiency from the output tiles
  (``tile_m x tile_n``) over the SMs: whole waves of tiles, and split-K when there are fewer tiles than SMs
  (each split writes and re-reads an fp32 partial output), so grad_h's few output tiles and the
  weight-gradient GEMM over a few hundred text-only rows cost what they do;
* **row kernels** (ours and Liger's JSD kernel): ``max(bytes / (bandwidth * occupancy factor),
  instructions / issue rate, exp2 / MUFU rate)``: bytes from the streams each pass reads and writes, the
  instructions and MUFU ops per logit of each pass read from the kernel compiled for sm_90 with Triton
  (``benchmarks.sass``; stated constants when Triton cannot compile here), the occupancy from its registers;
* **other kernels**: bytes read and written / bandwidth;
* **host syncs**: every scalar read back (``.item()``, ``nonzero``) at ``sync_us``.

The GEMM floor is the minimal GEMM work of the loss at the peak rate (``benchmarks.kernels``'
``gemm_floor:*``): VGS 4 forward GEMMs + 2 backward GEMMs (zs) on all rows + 2 backward GEMMs (zsp) on the
gated 30 %; standard OPD 2 + 2. ``--calibration`` takes the peak GEMM rate and the bandwidth from
``benchmarks.microbench`` (a square product and a copy: never the kernels modelled here) and reports the
modelled time of each microbenchmarked GEMM shape beside its measurement. Data-dependent steps take stated
values: every token valid, 30 % of the rows gated, ``fixup_fraction`` of them mispredicted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import common as C

aten = torch.ops.aten

# An H100 SXM5 80 GB (stated; --calibration replaces gemm_tflops and hbm_tbps with measurements): what cuBLAS
# reaches on large bf16 GEMMs (peak 989 dense), what a copy reaches from HBM3 (peak 3.35 TB/s); 132 SMs at
# 1.755 GHz, each issuing 4 warp instructions (128 thread instructions) and 16 MUFU ops per clock; the gap
# between two kernels on one stream; what a host sync costs (the queue drains and refills).
CONSTANTS = dict(
    device="H100 SXM5 80 GB",
    gemm_tflops=700.0,
    hbm_tbps=3.0,
    sms=132,
    clock_ghz=1.755,
    issue_per_clk_sm=128,
    mufu_per_clk_sm=16,
    launch_us=4.0,
    sync_us=10.0,
    tile_m=128,
    tile_n=256,
    splitk_min_k=1024,
    regs_per_sm=65536,
    max_warps_per_sm=64,
    warps_to_saturate_hbm=16,
    device_memory_gib=80.0,
    free_fraction=0.5,
)
QWEN = dict(hs=2048, ht=4096, vocab=151936, vocab_size=151669, dtype="bfloat16")
ROWS = (4096, 16384)
GATED_FRACTION = 0.3  # 1 - quantile 0.7
# Rows whose gate the driver's running-quantile prediction gets wrong (corrected in pass 2): stated
FIXUP_FRACTION = 0.02
# Per-logit costs of the row kernels when Triton cannot compile them here (sm_90, Triton 3.6, bf16, the
# driver's tile: benchmarks.sass): (pass A instructions, pass A MUFU, pass B instructions, pass B MUFU, regs)
FALLBACK_SASS = {"pass1": (49.9, 5.62, 41.6, 3.0, 79), "stats": (48.9, 5.62, 0.0, 0.0, 80),
                 "two_streams": (30.6, 3.38, 25.4, 2.0, 48), "prior_grad": (49.8, 5.62, 44.5, 4.0, 80),
                 "liger_jsd": (14.0, 2.0, 0.0, 0.0, 32)}


# ----------------------------------------------------------------------------- the device
def gemm_efficiency(m: int, n: int, k: int, c: dict) -> tuple[float, int]:
    """(fraction of the peak rate, split-K factor) of an [m, k] x [k, n] GEMM: its ``tile_m x tile_n`` output
    tiles run in whole waves over the SMs; splitting K in s parts (each part at least ``splitk_min_k`` long)
    makes s times more work units, and the split that wastes least of the last wave is taken (what cuBLAS's
    split-K / stream-K kernels do for long-K GEMMs with few output tiles). The split's fp32 partials are
    charged by the caller."""
    tiles = math.ceil(m / c["tile_m"]) * math.ceil(n / c["tile_n"])
    sms = c["sms"]
    best = (tiles / (math.ceil(tiles / sms) * sms), 1)
    for split in range(2, max(1, k // c["splitk_min_k"]) + 1):
        if tiles >= 4 * sms:  # enough waves: splitting buys nothing
            break
        units = tiles * split
        eff = units / (math.ceil(units / sms) * sms)
        if eff > best[0] + 0.02:  # a split must earn its partials
            best = (eff, split)
        if split >= 16:
            break
    return best


def occupancy(regs: int, warps_per_block: int, c: dict) -> int:
    """Warps resident per SM for a kernel of ``regs`` registers per thread (allocated per warp in units of 256)."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = c["regs_per_sm"] // max(per_warp, 1)
    blocks = max(1, min(by_regs, c["max_warps_per_sm"]) // warps_per_block)
    return blocks * warps_per_block


@dataclasses.dataclass
class KernelCost:
    """Per-logit costs of one row-kernel launch type, from its compiled SASS (or the stated fallback)."""

    instr_a: float
    mufu_a: float
    instr_b: float
    mufu_b: float
    regs: int
    stack_bytes: int = 0
    warps: int = 8
    source: str = "fallback"


def compile_costs(launches=("pass1", "stats", "two_streams", "prior_grad")) -> dict[str, KernelCost]:
    """Our row kernel's costs per launch type, compiled for sm_90 (benchmarks.sass), else the fallback."""
    out = {}
    for launch in launches:
        try:
            from .sass import inspect

            r = inspect(launch)
            out[launch] = KernelCost(r.pass_a_instr_per_logit, r.pass_a_mufu_per_logit, r.pass_b_instr_per_logit or 0.0,
                                     _pass_b_mufu(launch), r.registers, r.stack_bytes, r.warps,
                                     f"sm_90, Triton {r.triton}")
        except Exception as exc:  # noqa: BLE001 -- no triton / ptxas here: the stated numbers
            a, ma, b, mb, regs = FALLBACK_SASS[launch]
            out[launch] = KernelCost(a, ma, b, mb, regs, source=f"fallback ({type(exc).__name__})")
    return out


def _pass_b_mufu(launch: str) -> float:
    # exp2 per logit in pass B: p (zs gradient), p' (zsp gradient), r (the prior gradient)
    return {"pass1": 2.0, "stats": 0.0, "two_streams": 1.0, "prior_grad": 3.0}[launch]


def liger_jsd_cost() -> KernelCost:
    """Liger's Triton JSD kernel (beta = 1) compiled for sm_90 like ours, else the stated fallback."""
    try:
        import triton
        from liger_kernel.ops.jsd import _jsd_kernel
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from .sass import _resources, _sass, loops

        names = list(_jsd_kernel.arg_names)
        sig = {n: ("*fp32" if n.endswith("_ptr") else "i64" if n.endswith("stride") else "fp32" if n == "n_non_ignore"
                   else "i32" if n == "n_cols" else "constexpr") for n in names}
        const = {"beta": 1.0, "ignore_index": -100, "BLOCK_SIZE": 65536 // 4, "HAS_LABEL": False}
        src = ASTSource(fn=_jsd_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 32})
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "jsd.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            res, (found, _) = _resources(path), loops(_sass(path))
        body = max(found, key=lambda lp: lp["instructions"])
        per_thread = const["BLOCK_SIZE"] / (32 * 32)
        return KernelCost(body["instructions"] / per_thread, body["mufu"] / per_thread, 0.0, 0.0, res["registers"],
                          res["stack_bytes"], 32, f"sm_90, Triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001
        a, ma, _, _, regs = FALLBACK_SASS["liger_jsd"]
        return KernelCost(a, ma, 0.0, 0.0, regs, warps=32, source=f"fallback ({type(exc).__name__})")


# ----------------------------------------------------------------------------- recording
@dataclasses.dataclass
class Tally:
    gemm_flops: float = 0.0
    gemm_bytes: float = 0.0
    gemm_s: float = 0.0
    gemms: int = 0
    rows_bytes: float = 0.0
    rows_s: float = 0.0
    rows_mem_s: float = 0.0
    rows_issue_s: float = 0.0
    rows_mufu_s: float = 0.0
    row_kernels: int = 0
    other_bytes: float = 0.0
    other_s: float = 0.0
    other_kernels: int = 0
    syncs: int = 0
    sync_s: float = 0.0
    live: int = 0
    peak: int = 0
    allocs: int = 0
    weight_sized: list = dataclasses.field(default_factory=list)  # (dtype, shape, op)
    gemm_shapes: list = dataclasses.field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.rows_s + self.other_s + self.sync_s


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
_PREDICTED = (aten.gt.Scalar, aten.gt.Tensor)  # vds > theta: the predicted gate


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(x):
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


class CostMode(TorchDispatchMode):
    """Records the ops of a call on fake tensors (see the module doc); answers the data-dependent ones."""

    def __init__(self, k: dict, n_valid: int, weight_shape: tuple[int, int]):
        super().__init__()
        self.k, self.n_valid, self.weight_shape = k, n_valid, weight_shape
        self.t = Tally()
        self._seen: set[int] = set()
        self._fraction: dict[int, float] = {}  # ids of live boolean outputs -> share of True (nonzero's answer)

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
    def gemm(self, m: int, n: int, kk: int, nbytes: float) -> float:
        """Modelled seconds of one [m, kk] x [kk, n] GEMM moving ``nbytes`` (recorded)."""
        c = self.k
        eff, split = gemm_efficiency(m, n, kk, c)
        flops = 2.0 * m * n * kk
        if split > 1:
            nbytes += 2 * split * m * n * 4  # fp32 partials written and read back
        s = max(flops / (c["gemm_tflops"] * 1e12 * eff), nbytes / (c["hbm_tbps"] * 1e12)) + c["launch_us"] * 1e-6
        self.t.gemm_flops += flops
        self.t.gemm_bytes += nbytes
        self.t.gemm_s += s
        self.t.gemms += 1
        self.t.gemm_shapes.append((m, n, kk, split, round(eff, 3), 1e3 * s))
        return s

    def _gemm(self, func, args, kwargs, out) -> None:
        kind = _GEMMS[func]
        a, b = (args[0], args[1]) if kind == "mm" else (args[1], args[2])
        m, kk = a.shape
        n = b.shape[1]
        res = kwargs.get("out", out if isinstance(out, torch.Tensor) else None)
        if func is aten.addmm_.default:
            res = args[0]
        nbytes = _nbytes(a) + _nbytes(b) + m * n * res.element_size()
        if kind == "addmm" and kwargs.get("beta", 1) != 0:
            nbytes += _nbytes(args[0])
        self.gemm(m, n, kk, nbytes)

    def _other(self, func, args, kwargs, out) -> None:
        if func in _FREE or func.is_view or str(func).startswith("prim."):
            return
        ins = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        outs = _tensors(out)
        if func in (aten.index_select.default, aten.index_select.out, aten.index.Tensor, aten.gather.default):
            read = sum(_nbytes(t) for t in outs) + sum(_nbytes(t) for t in ins[1:])
        elif func in (aten.index_add_.default, aten.index_copy_.default):
            src = args[3]
            self._add_other(2 * _nbytes(src) + _nbytes(args[2]) + _nbytes(src))
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

    def row_kernel(self, nbytes: float, logits_a: float, logits_b: float, cost: KernelCost) -> None:
        """One row-kernel launch: ``nbytes`` moved, ``logits_a`` / ``logits_b`` entries through pass A / B."""
        c = self.k
        warps = occupancy(cost.regs, cost.warps, c)
        bw = c["hbm_tbps"] * 1e12 * min(1.0, warps / c["warps_to_saturate_hbm"])
        rate = c["sms"] * c["clock_ghz"] * 1e9
        mem = nbytes / bw
        issue = (cost.instr_a * logits_a + cost.instr_b * logits_b) / (rate * c["issue_per_clk_sm"])
        mufu = (cost.mufu_a * logits_a + cost.mufu_b * logits_b) / (rate * c["mufu_per_clk_sm"])
        s = max(mem, issue, mufu) + c["launch_us"] * 1e-6
        self.t.rows_bytes += nbytes
        self.t.rows_s += s
        self.t.rows_mem_s += mem
        self.t.rows_issue_s += issue
        self.t.rows_mufu_s += mufu
        self.t.row_kernels += 1

    def _sync(self) -> None:
        self.t.syncs += 1
        self.t.sync_s += self.k["sync_us"] * 1e-6

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:  # .item(), .tolist(), bool(): plausible constants
            self._sync()
            x = args[0]
            return True if x.dtype == torch.bool else (0.5 if x.is_floating_point() else self.n_valid)
        if func is aten.equal.default:  # Liger's "is the upstream gradient 1.0": yes (the loss is final)
            self._sync()
            return True
        if func is aten.nonzero.default:  # every token valid; predicted / corrected rows a stated share
            self._sync()
            x = args[0]
            n = round(self._fraction.get(id(x), 1.0) * x.numel())
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
        if func is aten.any.dim:  # (coef2 != 0).any(1): rows pass 2 corrects
            self._mark(out, FIXUP_FRACTION)
        elif func in _PREDICTED and isinstance(out, torch.Tensor) and out.dim() == 1:  # vds > theta
            self._mark(out, GATED_FRACTION)
        self._track(func, out, _tensors((args, kwargs)))
        return out

    def _mark(self, out: torch.Tensor, fraction: float) -> None:
        self._fraction[id(out)] = fraction
        weakref.finalize(out, self._fraction.pop, id(out), None)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.untyped_storage() is b.untyped_storage() and a.storage_offset() == b.storage_offset())


def analytic_rows(mode: CostMode, costs: dict[str, KernelCost]):
    """A row function following the row contract that does no math: it reports the bytes and per-logit
    costs of the Triton kernel's launch to ``mode`` and returns [n, 4] stats (shapes only)."""

    def rows_fn(zs, zsp, zt, ztp, coef, *, temperature, detach_target_prior, grad_zs=None, grad_zsp=None,
                vocab=None):
        n, width = zs.shape
        v = width if vocab is None else vocab
        two = _same(zs, zsp) and _same(zt, ztp)
        item = zs.element_size()
        grads = grad_zs is not None or grad_zsp is not None
        prior = grad_zsp is not None and not detach_target_prior
        launch = "two_streams" if two else ("prior_grad" if prior else ("pass1" if grads else "stats"))
        nbytes = n * v * item * (2 if two else 4)  # pass A
        if grads:
            nbytes += n * v * item * (2 if two or (grad_zs is None and not prior) else 4)
            nbytes += sum(n * width * g.element_size() for g in (grad_zs, grad_zsp) if g is not None)
        mode.row_kernel(nbytes, n * v, n * v if grads else 0.0, costs[launch])
        return torch.empty(n, 4, device=zs.device)

    return rows_fn


# ----------------------------------------------------------------------------- cases
def gemm_floor_flops(kind: str, n: int, hs: int, ht: int, v: int) -> float:
    """The minimal GEMM FLOPs of one fwd+bwd (as benchmarks.kernels' gemm_floor:vgs / :opd)."""
    if kind == "vgs":
        return 2 * n * v * (2 * hs + 2 * ht) + 4 * n * v * hs + 4 * round(GATED_FRACTION * n) * v * hs
    return 2 * n * v * (hs + ht) + 4 * n * v * hs


@contextlib.contextmanager
def _liger_stand_ins(mode: CostMode, cost: KernelCost):
    """Liger's fused-linear JSD as on a Hopper GPU, on fake CPU tensors: its fp32-output projection (it takes
    that path for CUDA tensors only) and its JSD dispatch (a Triton kernel) replaced by an analytic one."""
    import liger_kernel.ops.fused_linear_jsd as flj

    def project(inputs, weight):
        return torch.mm(inputs, weight.t(), out_dtype=torch.float32)

    def dispatch(name, x, y, labels, beta, ignore_index, n_non_ignore, **_):
        n, v = x.shape
        mode.row_kernel(n * v * (x.element_size() + y.element_size() + 4 + x.element_size()), n * v, 0.0, cost)
        return torch.empty(n, v, dtype=torch.float32, device=x.device), x  # loss tile, dx in place of x

    old = flj._project_to_float32, flj.dispatch
    flj._project_to_float32, flj.dispatch = project, dispatch
    try:
        yield
    finally:
        flj._project_to_float32, flj.dispatch = old


def model_case(name: str, rows: int, hs: int, ht: int, vocab: int, vocab_size: int | None, dtype: torch.dtype,
               k: dict, costs: dict[str, KernelCost] | None = None) -> dict:
    """Run one case on fake tensors; its counts, modelled time and peak temporaries."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vgs_kernels import hooks

    costs = costs if costs is not None else FALLBACK_COSTS
    mode = CostMode(k, rows, (vocab, hs))
    chunks: list[int] = []
    with FakeTensorMode():
        hs_ = torch.empty(rows, hs, dtype=dtype, requires_grad=True)
        ws = torch.empty(vocab, hs, dtype=dtype, requires_grad=True)
        ht_ = torch.empty(rows, ht, dtype=dtype)
        wt = torch.empty(vocab, ht, dtype=dtype)
        if name == "liger_jsd":
            from liger_kernel.transformers import LigerFusedLinearJSD

            fn = LigerFusedLinearJSD(jsd_beta=1.0, temperature=1.0)
            with _liger_stand_ins(mode, costs["liger_jsd"]), mode:
                fn(hs_, ws, ht_, wt, None).backward()
            chunks.append(min(rows, 2 ** math.ceil(math.log2(math.ceil(rows / math.ceil(vocab / hs))))))
        else:
            from vgs_kernels import fused_linear_vgs_loss
            from vgs_kernels.backends import Backend

            backend = Backend("triton", analytic_rows(mode, costs), ("cpu", "cuda"))
            hsp = torch.empty(rows, hs, dtype=dtype, requires_grad=True) if name == "vgs" else None
            htp = torch.empty(rows, ht, dtype=dtype) if name == "vgs" else None
            free = int(k["device_memory_gib"] * k["free_fraction"] * 2**30)

            def on_event(event, info):
                if event == "chunk" and info["pass_"] == 1:
                    chunks.append(info["chunk_size"])

            with hooks.simulate_gpu(free), hooks.observe(on_event), mode:
                out = fused_linear_vgs_loss(hs_, hsp, ws, ht_, htp, wt, mode="vgs" if name == "vgs" else "standard",
                                            vocab_size=vocab_size, backend=backend)
                out.loss.backward()
                del out
    t = mode.t
    floor = gemm_floor_flops("vgs" if name == "vgs" else "opd", rows, hs, ht, vocab)
    floor_s = floor / (k["gemm_tflops"] * 1e12)
    fp32_weight = [w for w in t.weight_sized if w[0] == "float32"]
    kc = costs["liger_jsd" if name == "liger_jsd" else ("pass1" if name == "vgs" else "two_streams")]
    return {
        "name": name, "rows": rows, "hidden_student": hs, "hidden_teacher": ht, "vocab": vocab,
        "vocab_size": vocab_size, "dtype": str(dtype).replace("torch.", ""),
        "chunk_rows": max(chunks) if chunks else None,
        "chunks": math.ceil(rows / max(chunks)) if chunks else None,
        "modelled_ms": 1e3 * t.total_s, "gemm_floor_ms": 1e3 * floor_s, "ratio_to_gemm_floor": t.total_s / floor_s,
        "gemm_ms": 1e3 * t.gemm_s, "gemm_flops": t.gemm_flops, "gemm_floor_flops": floor, "gemms": t.gemms,
        "gemm_flops_over_floor": t.gemm_flops / floor,
        "row_kernel_ms": 1e3 * t.rows_s, "row_kernel_bytes": t.rows_bytes, "row_kernels": t.row_kernels,
        "memory_bound_ms": 1e3 * t.rows_mem_s, "issue_bound_ms": 1e3 * t.rows_issue_s,
        "mufu_bound_ms": 1e3 * t.rows_mufu_s,
        "row_kernel_regs": kc.regs, "row_kernel_spill_bytes": kc.stack_bytes,
        "row_kernel_occupancy_warps": occupancy(kc.regs, kc.warps, k), "row_kernel_costs_from": kc.source,
        "other_ms": 1e3 * t.other_s, "other_bytes": t.other_bytes, "other_kernels": t.other_kernels,
        "host_syncs": t.syncs, "sync_ms": 1e3 * t.sync_s,
        "non_gemm_bytes": t.rows_bytes + t.other_bytes,
        "peak_temp_bytes": t.peak, "allocations": t.allocs,
        "weight_sized_temporaries": len(fp32_weight),
        "weight_sized_allocations": _count(t.weight_sized),
        "gemm_shapes": _gemm_summary(t.gemm_shapes),
    }


FALLBACK_COSTS = {launch: KernelCost(a, ma, b, mb, regs, source="fallback")
                  for launch, (a, ma, b, mb, regs) in FALLBACK_SASS.items()}
FALLBACK_COSTS["liger_jsd"].warps = 32


def _count(items) -> list[dict]:
    out: dict = {}
    for dt, shape, op in items:
        key = (dt, shape, op)
        out[key] = out.get(key, 0) + 1
    return [{"dtype": d, "shape": list(s), "op": o, "count": c} for (d, s, o), c in out.items()]


def _gemm_summary(shapes) -> list[dict]:
    out: dict = {}
    for m, n, kk, split, eff, ms in shapes:
        key = (m, n, kk, split, eff)
        o = out.setdefault(key, {"m": m, "n": n, "k": kk, "split_k": split, "efficiency": eff, "count": 0, "ms": 0.0})
        o["count"] += 1
        o["ms"] += ms
    return sorted(out.values(), key=lambda g: -g["ms"])


# ----------------------------------------------------------------------------- output
def table(cases: list[dict]) -> str:
    liger = {c["rows"]: c for c in cases if c["name"] == "liger_jsd"}
    rows = []
    for c in cases:
        lg = liger.get(c["rows"])
        vs = "-" if lg is None or c["name"] == "liger_jsd" else f"{c['modelled_ms'] / lg['modelled_ms']:.2f}x"
        rows.append([c["name"], str(c["rows"]), str(c["chunk_rows"]), f"{c['gemm_flops'] / 1e12:.1f}",
                     f"{c['non_gemm_bytes'] / 1e9:.1f}", f"{c['gemm_floor_ms']:.1f}", f"{c['gemm_ms']:.1f}",
                     f"{c['row_kernel_ms']:.1f} ({c['memory_bound_ms']:.1f} / {c['issue_bound_ms']:.1f})",
                     f"{c['other_ms']:.1f}", f"{c['sync_ms']:.2f}", f"{c['modelled_ms']:.1f}",
                     f"{c['ratio_to_gemm_floor']:.2f}x", vs, C.fmt_bytes(c["peak_temp_bytes"]),
                     f"{c['row_kernel_regs']} / {c['row_kernel_spill_bytes']}"])
    return C.table(rows, ["case", "B*T", "chunk rows", "GEMM TFLOP", "non-GEMM GB", "GEMM floor ms", "GEMM ms",
                          "row kernels ms (memory / issue)", "other ms", "syncs ms", "modelled ms", "modelled / floor",
                          "vs liger_jsd", "peak temporaries", "row kernel regs / stack B"])


def calibrate(k: dict, path: str) -> tuple[dict, list[dict]]:
    """Constants from ``benchmarks.microbench`` (the square GEMM's rate, the copy's bandwidth) and, for each
    microbenchmarked GEMM shape, the model's time beside the measurement."""
    doc = json.loads(Path(path).read_text())
    k = dict(k, gemm_tflops=doc["calibration"]["gemm_tflops"]["square"], hbm_tbps=doc["calibration"]["hbm_tbps"],
             device=doc.get("device", k["device"]), calibrated_from=str(path))
    check = []
    for g in doc["gemms"]:
        mode = CostMode(k, 1, (1, 1))
        item = 2 if "bfloat16" in doc.get("dtype", "") else 4
        nbytes = (g["m"] * g["k"] + g["k"] * g["n"]) * item + g["m"] * g["n"] * (4 if g["kind"] != "mm" else item)
        if g["kind"] == "addmm_fp32_acc":
            nbytes += g["m"] * g["n"] * 4
        ms = 1e3 * (mode.gemm(g["m"], g["n"], g["k"], nbytes) - k["launch_us"] * 1e-6)
        check.append({"name": g["name"], "measured_ms": 1e3 * g["seconds"], "modelled_ms": ms,
                      "modelled_over_measured": ms / (1e3 * g["seconds"])})
    return k, check


def run(args) -> dict:
    k = dict(CONSTANTS)
    for key in ("gemm_tflops", "hbm_tbps", "launch_us", "sync_us", "device_memory_gib", "free_fraction"):
        if getattr(args, key, None) is not None:
            k[key] = getattr(args, key)
    gemm_check = []
    if args.calibration:
        k, gemm_check = calibrate(k, args.calibration)
    dtype = getattr(torch, args.dtype)
    vocab_size = args.vocab_size if args.vocab_size and args.vocab_size < args.vocab else None
    costs = compile_costs() if not args.no_compile else dict(FALLBACK_COSTS)
    if "liger_jsd" in args.cases:
        costs["liger_jsd"] = liger_jsd_cost() if not args.no_compile else FALLBACK_COSTS["liger_jsd"]
    cases = []
    for rows in args.rows:
        for name in args.cases:
            t0 = time.perf_counter()
            try:
                c = model_case(name, rows, args.hs, args.ht, args.vocab, vocab_size, dtype, k, costs)
            except ImportError as exc:
                print(f"# {name}: skipped ({exc})", flush=True)
                continue
            c["trace_s"] = time.perf_counter() - t0
            cases.append(c)
            print(f"  {name:10s} B*T={rows:6d} chunk={c['chunk_rows']}  modelled {c['modelled_ms']:8.1f} ms  "
                  f"floor {c['gemm_floor_ms']:7.1f} ms  ({c['ratio_to_gemm_floor']:.2f}x)  row kernels "
                  f"{c['row_kernel_ms']:.1f} ms (issue {c['issue_bound_ms']:.1f})  peak {C.fmt_bytes(c['peak_temp_bytes'])}",
                  flush=True)
    import vgs_kernels

    root = Path(vgs_kernels.__file__).resolve().parent.parent
    return {
        "benchmark": "gpu_model",
        "schema_version": 2,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_model", *sys.argv[1:]]),
        "versions": {**C.versions(), "git_commit": _git_commit(root)},
        "constants": k,
        "row_kernel_costs": {n: dataclasses.asdict(c) for n, c in costs.items()},
        "gemm_model_check": gemm_check,
        "assumptions": {
            "gated_fraction": GATED_FRACTION, "mask": "all tokens valid", "fixup_fraction": FIXUP_FRACTION,
            "gemms": "max(FLOPs / (peak x wave or split-K efficiency), bytes / bandwidth) + launch; tiles "
                     f"{k['tile_m']} x {k['tile_n']}; split-K below {k['sms']} output tiles when K >= "
                     f"{k['splitk_min_k']} per split, its fp32 partials written and read",
            "row_kernels": "max(bytes / (bandwidth x min(1, resident warps / warps_to_saturate_hbm)), instructions / "
                           "issue rate, MUFU ops / MUFU rate) + launch; per-logit instructions and MUFU ops of each "
                           "pass from the SASS of the kernel compiled for sm_90 (row_kernel_costs)",
            "host_syncs": f"{k['sync_us']} us each (.item(), nonzero)",
            "liger": "LigerFusedLinearJSD(jsd_beta=1) as on a Hopper GPU: its chunking, fp32-output projection "
                     "(stand-in: torch.mm(out_dtype=fp32), which it uses for CUDA tensors), its eager PyTorch ops "
                     "one kernel each, its Triton JSD kernel counted like ours (stand-in for the dispatch: bytes "
                     "read and written, its SASS); the torch.compile'd chunked_loss variant is not modelled "
                     "(inductor needs a GPU to generate its kernels)",
            "overlap": "none: every op on one stream, back to back",
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
    for key in ("gemm_tflops", "hbm_tbps", "launch_us", "sync_us", "device_memory_gib", "free_fraction"):
        p.add_argument("--" + key.replace("_", "-"), type=float, help=f"default {CONSTANTS[key]}")
    p.add_argument("--calibration", help="benchmarks.microbench JSON: the peak GEMM rate and the bandwidth")
    p.add_argument("--no-compile", action="store_true", help="the stated per-logit costs, not the compiled SASS")
    p.add_argument("--name", default="gpu_model", help="results file stem")
    p.add_argument("--out-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run(args)
    print("# constants: " + ", ".join(f"{k}={v}" for k, v in doc["constants"].items()), flush=True)
    text = table(doc["cases"])
    print(text, flush=True)
    for g in doc["gemm_model_check"]:
        print(f"  GEMM {g['name']:20s} measured {g['measured_ms']:8.3f} ms, modelled {g['modelled_ms']:8.3f} ms "
              f"({g['modelled_over_measured']:.2f}x)", flush=True)
    doc["table_markdown"] = text
    if not args.no_write:
        path = C.write_json(Path(args.out_dir) / f"{args.name}.json", doc)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
