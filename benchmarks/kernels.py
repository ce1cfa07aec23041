"""Kernel benchmark: forward+backward of the fused-linear VGS loss against the standard-OPD anchors.

    python -m benchmarks.kernels            # GPU shapes when CUDA is present, CPU shapes otherwise
    python -m benchmarks.kernels --quick    # CI-sized (seconds)

Cases, each timed as one forward + backward. Per B*T, inputs and weights are allocated once and
each case is built once (its closure, and for the GEMM floors their output buffers, allocated and
touched before any timed run); the closures are reused by every warm-up, memory and timed run, and
the inputs' ``.grad`` is set to None before each run, outside the timed region:

* ``vgs:<backend>``: ``fused_linear_vgs_loss(mode="vgs")`` for every backend of
  ``vgs_kernels.backends()`` available on the device (``reference`` materialises all logits;
  ``triton`` on CPU would be the interpreter and is not benchmarked);
* ``std:<auto backend>``: the same kernel in ``mode="standard"`` (standard OPD through our code),
  with None for the two text-only hidden streams (no text-only GEMMs);
* ``liger:chunked``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``liger_kernel.chunked_loss``) with
  ``beta=1`` (reverse KL), ``weight_hard_loss=0``, ``weight_soft_loss=1`` -- the standard-OPD anchor;
* ``liger:triton``: Liger-Kernel's ``LigerFusedLinearJSD`` (``liger_kernel.transformers``, Triton
  kernels) with ``jsd_beta=1``; CUDA only (on CPU Triton needs its interpreter);
* ``torch_rkl``: plain PyTorch reverse KL(student || teacher) on materialised fp32 logits, autograd;
* ``gemm_floor:vgs`` / ``gemm_floor:opd``: the loss's matmuls alone, in the input dtype, in large
  row chunks into buffers allocated (and zeroed) when the case is built, shared by the three floor
  cases of a B*T (they stay allocated through the B*T's interleaved timed rounds: 3 x chunk x V
  in the input dtype, 7.5 GB at the GPU default of 8192 rows, V = 151936, bf16). VGS: 4 forward GEMMs (zs, zsp with H_s; zt, ztp with H_t),
  the 2 backward GEMMs of zs (grad_hidden, grad_weight) on every row and the 2 of zsp on the gated
  30 % of rows (the language term has a gradient only there) -- the minimal set. OPD: 2 forward +
  2 backward. ``gemm_floor:vgs-driver``: the minimal set plus the forward GEMMs of zsp and ztp
  recomputed on every gated row -- what the two-pass driver ran before its predicted gate (it now
  recomputes only the rows whose gate it mispredicted, a few percent: its GEMMs lie between the two
  floors, near ``gemm_floor:vgs``).

Results go to ``benchmarks/results/kernels-<device>.json`` and two PNG plots; a table of ratios
against the targets of issue 7 is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import common as C

GPU_SHAPES = dict(bts=[1024, 4096, 8192, 16384, 32768], hs=2048, ht=4096, vocab=151936, dtype="bfloat16")
CPU_SHAPES = dict(bts=[512, 1024, 2048, 4096], hs=256, ht=512, vocab=32000, dtype="float32")
QUICK_GPU = dict(bts=[512, 1024], hs=2048, ht=4096, vocab=151936, dtype="bfloat16")
QUICK_CPU = dict(bts=[64, 128], hs=32, ht=64, vocab=2048, dtype="float32")

# Timed runs per case and B*T: full runs make at least FULL_MIN_REPEATS (up to FULL_REPEATS while the
# per-case budget lasts); --quick is a smoke run.
FULL_REPEATS, FULL_MIN_REPEATS, QUICK_REPEATS = 7, 5, 2

GATED_FRACTION = 0.3  # 1 - quantile 0.7: rows whose language term has a gradient in mode="vgs"
MEM_TARGET_BT = {"cuda": 8192, "cpu": 4096}
RAM_FRACTION = 0.5  # CPU: skip a case whose extrapolated peak exceeds this fraction of available RAM

TARGETS_DOC = {
    "vgs_time_vs_liger": "fused VGS loss time <= 2.0x Liger's fused reverse KL (same B*T)",
    "std_time_vs_liger": "our standard-OPD loss (mode='standard', same backend) time <= 1.0x Liger's fused reverse "
                         "KL: the same work, so the comparison of the kernels alone",
    "gemm_floor_fraction": "fused VGS loss reaches >= 65 % of its measured GEMM floor (GPU target)",
    "vgs_mem_vs_liger": "fused VGS peak memory <= 1.2x Liger's",
    "reference_mem_over_vgs": "fused VGS peak memory >= 8x below the materialised reference at "
                              "B*T = 8192 (GPU) / 4096 (CPU)",
}


@dataclass
class Inputs:
    hs: torch.Tensor
    hsp: torch.Tensor
    ws: torch.Tensor
    ht: torch.Tensor
    htp: torch.Tensor
    wt: torch.Tensor
    labels: torch.Tensor
    # Work buffers that cases built on these inputs share (the GEMM floors' outputs), freed with them.
    scratch: dict = field(default_factory=dict)

    def clear_grads(self) -> None:
        for t in (self.hs, self.hsp, self.ws):
            t.grad = None


def make_inputs(bt: int, hs: int, ht: int, vocab: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> Inputs:
    """Random hidden states (unit variance) and lm_head weights scaled so logits have std ~ 2
    (``weights`` = (ws, wt) reuses the weights of an earlier call)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    if weights is None:
        ws = rnd(vocab, hs, scale=2.0 / math.sqrt(hs))
        wt = rnd(vocab, ht, scale=2.0 / math.sqrt(ht))
    else:
        ws, wt = weights
    return Inputs(
        hs=rnd(bt, hs).requires_grad_(), hsp=rnd(bt, hs).requires_grad_(), ws=ws.requires_grad_(),
        ht=rnd(bt, ht), htp=rnd(bt, ht), wt=wt,
        labels=torch.zeros(bt, dtype=torch.long, device=device),
    )


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    group: str  # vgs | std | liger | torch | floor
    description: str
    build: Callable[[Inputs], Callable[[], None]]
    flops: Callable[[int, int, int, int], float] | None = None


def _vgs_case(backend: str, mode: str = "vgs") -> Case:
    from vgs_kernels import fused_linear_vgs_loss

    def build(x: Inputs):
        hsp, htp = (x.hsp, x.htp) if mode == "vgs" else (None, None)  # standard OPD: no text-only streams

        def fn():
            out = fused_linear_vgs_loss(x.hs, hsp, x.ws, x.ht, htp, x.wt, mode=mode, backend=backend)
            out.loss.backward()
        return fn

    group = "vgs" if mode == "vgs" else "std"
    desc = f"vgs_kernels.fused_linear_vgs_loss(mode={mode!r}, backend={backend!r}), fwd+bwd"
    if mode != "vgs":
        desc += ", text-only streams None"
    return Case(f"{group}:{backend}", group, desc, build)


def _liger_chunked_case(compiled: bool) -> Case:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                      temperature=1.0, compiled=compiled)

    def build(x: Inputs):
        def fn():
            loss = loss_fn(x.hs, x.ws, x.ht, x.wt, x.labels)
            loss.backward()
        return fn

    desc = (f"liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=1, weight_hard_loss=0, "
            f"weight_soft_loss=1, compiled={compiled}, chunk_size=1024), fwd+bwd")
    return Case("liger:chunked", "liger", desc, build)


def _liger_triton_case() -> Case:
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss_fn = LigerFusedLinearJSD(jsd_beta=1.0, temperature=1.0)

    def build(x: Inputs):
        def fn():
            loss = loss_fn(x.hs, x.ws, x.ht, x.wt, None)
            loss.backward()
        return fn

    desc = "liger_kernel.transformers.LigerFusedLinearJSD(jsd_beta=1) (Triton), fwd+bwd"
    return Case("liger:triton", "liger", desc, build)


def _torch_rkl_case() -> Case:
    def build(x: Inputs):
        def fn():
            ls = torch.log_softmax(F.linear(x.hs, x.ws).float(), -1)
            with torch.no_grad():
                lt = torch.log_softmax(F.linear(x.ht, x.wt).float(), -1)
            loss = (ls.exp() * (ls - lt)).sum(-1).mean()
            loss.backward()
        return fn

    return Case("torch_rkl", "torch", "plain PyTorch reverse KL on materialised fp32 logits, autograd", build)


def _gemm_floor_case(kind: str, chunk_rows: int) -> Case:
    """The loss's matmuls alone (see module doc)."""

    def build(x: Inputs):
        n, vocab = x.hs.shape[0], x.ws.shape[0]
        rows = min(n, chunk_rows)
        dev = x.hs.device
        ws, wt = x.ws.detach(), x.wt
        hs, hsp, ht, htp = x.hs.detach(), x.hsp.detach(), x.ht, x.htp

        def buf(name, shape, like):
            # Allocated and zeroed here, outside any timed region (no first-touch page faults in a
            # timed run), and shared by the floor cases of these inputs (they never run at once).
            key = ("gemm_floor", name, tuple(shape))
            if key not in x.scratch:
                x.scratch[key] = torch.zeros(shape, device=dev, dtype=like.dtype)
            return x.scratch[key]

        buf_s = buf("s", (rows, vocab), hs)
        buf_sp = buf("sp", (rows, vocab), hs) if kind != "opd" else None
        buf_t = buf("t", (rows, vocab), ht)
        gh_s = buf("gh_s", tuple(hs.shape), hs)
        gh_sp = buf("gh_sp", tuple(hsp.shape), hsp) if kind != "opd" else None
        gw = buf("gw", tuple(ws.shape), ws)

        def fn():
            gw.zero_()
            for a in range(0, n, rows):
                b = min(a + rows, n)
                m = b - a
                zs = torch.mm(hs[a:b], ws.t(), out=buf_s[:m])
                torch.mm(ht[a:b], wt.t(), out=buf_t[:m])
                if kind != "opd":
                    zsp = torch.mm(hsp[a:b], ws.t(), out=buf_sp[:m])
                    torch.mm(htp[a:b], wt.t(), out=buf_t[:m])
                torch.mm(zs, ws, out=gh_s[a:b])
                gw.addmm_(zs.t(), hs[a:b])
                if kind != "opd":
                    g = int(round(GATED_FRACTION * m))
                    if g:
                        if kind == "vgs-driver":  # pass 2 recomputes zsp and ztp of the gated rows
                            zsp = torch.mm(hsp[a:a + g], ws.t(), out=buf_sp[:g])
                            torch.mm(htp[a:a + g], wt.t(), out=buf_t[:g])
                        torch.mm(zsp[:g], ws, out=gh_sp[a:a + g])
                        gw.addmm_(zsp[:g].t(), hsp[a:a + g])
        return fn

    if kind == "vgs":
        desc = (f"4 fwd GEMMs + 2 bwd GEMMs (zs) on all rows + 2 bwd GEMMs (zsp) on {GATED_FRACTION:.0%} of "
                f"rows, input dtype, row chunks of {chunk_rows}")

        def flops(n, hs_, ht_, v):
            return 2 * n * v * (2 * hs_ + 2 * ht_) + 4 * n * v * hs_ + 4 * round(GATED_FRACTION * n) * v * hs_
    elif kind == "vgs-driver":
        desc = (f"gemm_floor:vgs plus the forward GEMMs of zsp and ztp recomputed on the {GATED_FRACTION:.0%} gated "
                f"rows (the driver before its predicted gate; it now recomputes only mispredicted rows), row chunks "
                f"of {chunk_rows}")

        def flops(n, hs_, ht_, v):
            g = round(GATED_FRACTION * n)
            return 2 * n * v * (2 * hs_ + 2 * ht_) + 4 * n * v * hs_ + 4 * g * v * hs_ + 2 * g * v * (hs_ + ht_)
    else:
        desc = f"2 fwd GEMMs + 2 bwd GEMMs (zs), input dtype, row chunks of {chunk_rows}"

        def flops(n, hs_, ht_, v):
            return 2 * n * v * (hs_ + ht_) + 4 * n * v * hs_
    return Case(f"gemm_floor:{kind}", "floor", desc, build, flops)


def select_cases(device: torch.device, args) -> tuple[list[Case], dict]:
    """The cases that run here, and {name: reason} for those that do not."""
    import vgs_kernels
    from vgs_kernels.backends import is_available

    cases: list[Case] = []
    skipped: dict[str, str] = {}
    avail = vgs_kernels.backends()
    runnable = []
    for name, status in avail.items():
        if not is_available(status):
            skipped[f"vgs:{name}"] = status
        elif name == "triton" and device.type != "cuda":
            skipped["vgs:triton"] = "CPU: only the Triton interpreter runs here; the interpreter is not benchmarked"
        elif name == "cuda" and device.type != "cuda":
            skipped["vgs:cuda"] = "not a CUDA device"
        elif name == "cpu" and device.type != "cpu":
            skipped["vgs:cpu"] = "the cpu backend runs on CPU tensors only"
        else:
            runnable.append(name)
    # Fused backends first, the materialised reference last (slowest, biggest).
    order = ["triton", "cuda", "cpu", "torch", "reference"]
    runnable.sort(key=lambda n: order.index(n) if n in order else len(order))
    for name in runnable:
        cases.append(_vgs_case(name))
    auto = _auto_backend(device)
    if auto:
        cases.append(_vgs_case(auto, mode="standard"))

    compiled = {"auto": device.type == "cuda" or not args.quick, "on": True, "off": False}[args.liger_compiled]
    try:
        cases.append(_liger_chunked_case(compiled))
    except Exception as exc:  # noqa: BLE001
        skipped["liger:chunked"] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda":
        try:
            cases.append(_liger_triton_case())
        except Exception as exc:  # noqa: BLE001
            skipped["liger:triton"] = f"{type(exc).__name__}: {exc}"
    else:
        skipped["liger:triton"] = ("Liger's LigerFusedLinearJSD is Triton kernels: on CPU they run only under "
                                   "TRITON_INTERPRET=1, which is not benchmarked")
    cases.append(_torch_rkl_case())
    floor_rows = args.floor_chunk or (8192 if device.type == "cuda" else 1024)
    cases.append(_gemm_floor_case("vgs", floor_rows))
    cases.append(_gemm_floor_case("vgs-driver", floor_rows))
    cases.append(_gemm_floor_case("opd", floor_rows))
    if getattr(args, "skip_cases", None):
        for c in [c for c in cases if c.name in args.skip_cases]:
            skipped[c.name] = "not selected (--skip-cases)"
            cases.remove(c)
    if args.cases:
        keep = [c for c in cases if any(s in c.name for s in args.cases)]
        for c in cases:
            if c not in keep:
                skipped[c.name] = "not selected (--cases)"
        cases = keep
    return cases, skipped


def _auto_backend(device: torch.device) -> str | None:
    from vgs_kernels.backends import resolve

    try:
        be = resolve("auto", device)
    except ValueError:
        return None
    return "reference" if be is None else be.name


# ----------------------------------------------------------------------------- running
def anchor_check(shapes, dtype, device, cases) -> dict:
    """Loss values of the standard-OPD paths on one small batch: they compute the same reverse KL
    (token mean), so they must agree -- the anchors measure the same quantity as our standard mode.
    Without liger-kernel its rows say so."""
    from vgs_kernels import fused_linear_vgs_loss

    def liger_chunked(*args):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=False)(*args)

    x = make_inputs(64, shapes["hs"], shapes["ht"], shapes["vocab"], dtype, device, seed=123)
    vals = {}
    auto = _auto_backend(device)
    hsp, htp = None, None
    attempts = {
        f"std:{auto}": lambda: fused_linear_vgs_loss(x.hs, hsp, x.ws, x.ht, htp, x.wt, mode="standard",
                                                     backend=auto).loss,
        "liger:chunked": lambda: liger_chunked(x.hs, x.ws, x.ht, x.wt, x.labels),
        "torch_rkl": lambda: (lambda ls, lt: (ls.exp() * (ls - lt)).sum(-1).mean())(
            torch.log_softmax(F.linear(x.hs, x.ws).float(), -1), torch.log_softmax(F.linear(x.ht, x.wt).float(), -1)),
    }
    if any(c.name == "liger:triton" for c in cases):
        from liger_kernel.transformers import LigerFusedLinearJSD

        attempts["liger:triton"] = lambda: LigerFusedLinearJSD(jsd_beta=1.0)(x.hs, x.ws, x.ht, x.wt, None)
    for name, f in attempts.items():
        try:
            vals[name] = float(f().detach())
        except Exception as exc:  # noqa: BLE001
            vals[name] = f"{type(exc).__name__}: {exc}"[:300]
    nums = [v for v in vals.values() if isinstance(v, float)]
    spread = (max(nums) - min(nums)) / max(abs(max(nums)), 1e-12) if nums else None
    return {"bt": 64, "loss": vals, "relative_spread": spread}


# time per run relative to the case group's GEMM floor, for the up-front estimate only
_ESTIMATE_FACTOR = {"vgs": 1.6, "std": 1.4, "liger": 2.0, "torch": 2.5, "floor": 1.0}


def _upfront_estimate(cases: list, shapes: dict, dtype, device, args) -> float:
    """Seconds the run should take before any case runs: each case's GEMM floor at a measured GEMM rate (a
    [512, H] x [H, V] product here), times a per-group factor, times its runs."""
    hs, ht, v = shapes["hs"], shapes["ht"], shapes["vocab"]
    a = torch.randn(512, hs, device=device, dtype=dtype)
    b = torch.randn(hs, v, device=device, dtype=dtype)
    C.sync(device)
    t = time.perf_counter()
    for _ in range(2):
        a @ b
    C.sync(device)
    rate = 2 * 2 * 512 * hs * v / max(time.perf_counter() - t, 1e-9)
    total = 0.0
    for case in cases:
        group = case.name.split(":")[0] if case.group != "floor" else "floor"
        for bt in shapes["bts"]:
            vgs = "vgs" in case.name
            flops = 2 * bt * v * (2 * hs + 2 * ht) + (4 + 0.3 * 4) * bt * v * hs if vgs else \
                2 * bt * v * (hs + ht) + 4 * bt * v * hs
            if case.group == "reference" or case.name.endswith(":reference"):
                flops *= 2
            one = flops / rate * _ESTIMATE_FACTOR.get(group, 2.0)
            total += one * (args.warmup + (0 if args.no_memory else 1) + min(args.repeats, max(
                args.min_repeats, args.budget / max(one, 1e-9))))
    return total


def run(args, partial_path=None) -> dict:
    global RAM_FRACTION
    RAM_FRACTION = args.ram_fraction
    device = C.pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    shapes = dict((QUICK_GPU if device.type == "cuda" else QUICK_CPU) if args.quick
                  else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES))
    for key in ("bts", "hs", "ht", "vocab", "dtype"):
        if getattr(args, key, None):
            shapes[key] = getattr(args, key)
    dtype = getattr(torch, shapes["dtype"])
    cases, skipped = select_cases(device, args)
    est = _upfront_estimate(cases, shapes, dtype, device, args)
    print(f"# {len(cases)} cases x {len(shapes['bts'])} B*T: expected about {est / 60:.1f} min (a GEMM-rate "
          "estimate; refined after the first B*T's warm-ups); partial results are written after each B*T", flush=True)
    with C.frozen_heap():
        doc = _measure(args, device, shapes, dtype, cases, skipped, partial_path)
    doc["upfront_estimate_s"] = est
    return doc


def _estimate(recs: dict, live: list, bts: list[int], args) -> float:
    """Seconds the whole run should take, from the first B*T's warm-up runs (each case's time per run scaled
    linearly in B*T; warm-up, memory and timed runs, at most the per-case budget)."""
    total = 0.0
    for case in live:
        per_run = recs[case.name]["wall_s"] / max(1, args.warmup + (0 if args.no_memory else 1))
        for bt in bts:
            t = per_run * bt / bts[0]
            timed = min(args.repeats * t, max(args.min_repeats * t, args.budget))
            total += t * (args.warmup + (0 if args.no_memory else 1)) + timed
    return total


def _measure(args, device: torch.device, shapes: dict, dtype: torch.dtype, cases: list, skipped: dict,
             partial_path=None) -> dict:
    """The results document: per B*T, every case built once, warmed up and measured for memory, then timed
    in interleaved rounds."""
    doc = C.header(device, args, "kernels")
    doc.update(
        shapes={"bt": shapes["bts"], "hidden_student": shapes["hs"], "hidden_teacher": shapes["ht"],
                "vocab": shapes["vocab"], "dtype": shapes["dtype"], "layout": "[B*T, H] (one sequence), "
                "mask all True"},
        loss_options={"mode": "vgs", "alpha": 2.0, "beta": 0.01, "quantile": 0.7, "reduction": "sequence",
                      "temperature": 1.0},
        timing={"warmup": args.warmup, "repeats": args.repeats, "min_repeats": args.min_repeats,
                "budget_s_per_case": args.budget, "statistic": "median of repeats (wall clock, synced)",
                "order": "per B*T: each case built once (closure and work buffers), then its warm-up runs and "
                         "one peak-memory run; then timed runs of the same closures with the cases interleaved "
                         "round by round (order reversed every other round); .grad of the inputs set to None "
                         "before every run, outside the timed region; a case stops after min_repeats runs once "
                         "its timed runs exceed the budget",
                "n": "number of timed runs of each cell: 'n' in every result"},
        memory_method=C.CUDA_MEMORY_METHOD if device.type == "cuda" else C.CPU_MEMORY_METHOD,
        backends={k: v for k, v in __import__("vgs_kernels").backends().items()},
        cases={c.name: c.description for c in cases},
        standard_text_streams=C.STANDARD_TEXT_STREAMS,
        skipped=skipped,
        results=[],
    )
    print(f"# kernels benchmark on {doc['device']['name']}  dtype={shapes['dtype']}  V={shapes['vocab']}  "
          f"H_s={shapes['hs']}  H_t={shapes['ht']}  B*T={shapes['bts']}", flush=True)
    for name, why in skipped.items():
        print(f"#   skipped {name}: {why}", flush=True)

    doc["anchor_check"] = anchor_check(shapes, dtype, device, cases)
    print(f"# standard-OPD loss on one 64-token batch (must agree): {doc['anchor_check']['loss']}", flush=True)
    mem_hist: dict[str, tuple[int, int]] = {}  # case -> (bt, peak bytes) for the CPU RAM guard
    weights = None
    for bt in shapes["bts"]:
        x = make_inputs(bt, shapes["hs"], shapes["ht"], shapes["vocab"], dtype, device, seed=args.seed + bt,
                        weights=weights)
        weights = (x.ws, x.wt)
        recs, live = {}, []
        fns: dict[str, Callable[[], None]] = {}  # built once per B*T, reused by every run below
        # Phase 1, case by case: build, warm-up runs, then one run for peak memory.
        for case in cases:
            rec = recs[case.name] = {"bt": bt, "case": case.name, "group": case.group, "wall_s": 0.0}
            guard = _ram_guard(device, case.name, bt, mem_hist)
            if guard:
                rec.update(status="skipped", reason=guard)
                continue
            t0 = time.perf_counter()
            try:
                fn = case.build(x)
                for _ in range(args.warmup):
                    x.clear_grads()
                    fn()
                    C.sync(device)
                if not args.no_memory:
                    mem = C.peak_memory(fn, x.clear_grads, device)
                    rec.update(mem)
                    mem_hist[case.name] = (bt, mem["peak_bytes"])
                fns[case.name] = fn
                del fn
                live.append(case)
            except Exception as exc:  # noqa: BLE001 -- record and go on: one failing case is a result
                _fail(rec, exc, args)
            x.clear_grads()
            C.free_memory(device)
            rec["wall_s"] += time.perf_counter() - t0
            rec["warmup_s"] = rec["wall_s"]
            print(f"  B*T={bt:6d} {case.name:22s} built and warmed up in {rec['wall_s']:.1f} s"
                  + (f" ({rec['status']})" if rec.get("status") else ""), flush=True)
        if bt == shapes["bts"][0] and live:
            est = _estimate(recs, live, shapes["bts"], args)
            doc["estimated_total_s"] = est
            print(f"# from these warm-ups: about {est / 60:.1f} min for the whole run", flush=True)
        # Phase 2: timed runs, cases interleaved (order reversed every other round) so that load
        # from other work on a shared machine spreads over all cases instead of hitting one.
        times: dict[str, list[float]] = {c.name: [] for c in live}
        for rnd in range(args.repeats):
            for case in (live if rnd % 2 == 0 else list(reversed(live))):
                t, rec = times[case.name], recs[case.name]
                if rec.get("status") or (len(t) >= args.min_repeats and sum(t) > args.budget):
                    continue
                t0 = time.perf_counter()
                fn = fns[case.name]
                try:
                    x.clear_grads()
                    C.sync(device)
                    t1 = time.perf_counter()
                    fn()
                    C.sync(device)
                    t.append(time.perf_counter() - t1)
                except Exception as exc:  # noqa: BLE001
                    _fail(rec, exc, args)
                    del fns[case.name]  # failed: never run again, let its memory go
                del fn
                x.clear_grads()
                rec["wall_s"] += time.perf_counter() - t0
            print(f"  B*T={bt:6d} timed round {rnd + 1}/{args.repeats} done", flush=True)
        for case in cases:
            rec = recs[case.name]
            t = times.get(case.name)
            if not rec.get("status") and t:
                rec.update(status="ok", median_s=statistics.median(t), min_s=min(t), max_s=max(t), times_s=t,
                           n=len(t))
                if case.flops:
                    fl = case.flops(bt, shapes["hs"], shapes["ht"], shapes["vocab"])
                    rec.update(flops=fl, tflops_per_s=fl / rec["median_s"] / 1e12)
            doc["results"].append(rec)
            if rec.get("status") == "ok":
                print(f"  B*T={bt:6d} {case.name:22s} {C.fmt_time(rec['median_s']):>10s}  "
                      f"peak {C.fmt_bytes(rec.get('peak_bytes')):>10s}  (n={rec['n']})", flush=True)
            else:
                why = rec.get("error") or rec.get("reason") or ""
                print(f"  B*T={bt:6d} {case.name:22s} {rec.get('status')}: {why[:200]}", flush=True)
        fns.clear()
        del x
        C.free_memory(device)
        if partial_path is not None:  # what is measured so far survives an interrupted run
            C.write_json(partial_path, {**doc, "partial": True, "done_bt": bt})
    del weights

    doc["machine_state_end"] = C.machine_state()
    doc["ratios"] = ratios(doc)
    return doc


def _fail(rec: dict, exc: BaseException, args) -> None:
    rec.update(status="oom" if C.is_oom(exc) else "error", error=f"{type(exc).__name__}: {exc}"[:500])
    if rec["status"] == "error" and args.verbose:
        traceback.print_exc()


def _ram_guard(device, name, bt, hist) -> str | None:
    """CPU only: skip a case whose peak, extrapolated linearly from a smaller B*T, would not fit in
    half of the RAM available now (the OS would kill the process, and others on the machine)."""
    if device.type != "cpu" or name not in hist:
        return None
    prev_bt, prev_peak = hist[name]
    est = prev_peak * bt / prev_bt * 1.2
    avail = C.meminfo("MemAvailable")
    if avail is not None and est > RAM_FRACTION * avail:
        return (f"estimated peak {C.fmt_bytes(est)} (scaled from B*T={prev_bt}) exceeds {RAM_FRACTION:.0%} of the "
                f"{C.fmt_bytes(avail)} RAM available")
    return None


# ----------------------------------------------------------------------------- ratios & targets
def _index(doc) -> dict:
    return {(r["bt"], r["case"]): r for r in doc["results"] if r.get("status") == "ok"}


def ratios(doc) -> dict:
    """Every measured ratio against the targets of issue 7, per fused VGS backend and B*T."""
    idx = _index(doc)
    dev = doc["device"]["type"]
    fused = sorted({r["case"] for r in doc["results"] if r["group"] == "vgs" and r["case"] != "vgs:reference"})
    ligers = sorted({r["case"] for r in doc["results"] if r["group"] == "liger"})
    rows = []
    for bt in doc["shapes"]["bt"]:
        floor = idx.get((bt, "gemm_floor:vgs"))
        ref = idx.get((bt, "vgs:reference"))
        for case in fused:
            v = idx.get((bt, case))
            if not v:
                continue
            row = {"bt": bt, "backend": case.split(":", 1)[1], "time_s": v["median_s"], "n": C.repeats_of(v),
                   "peak_bytes": v.get("peak_bytes")}
            for lg in ligers:
                lr = idx.get((bt, lg))
                if lr:
                    row[f"time_vs_{lg}"] = v["median_s"] / lr["median_s"]
                    if v.get("peak_bytes") is not None and lr.get("peak_bytes"):
                        row[f"mem_vs_{lg}"] = v["peak_bytes"] / lr["peak_bytes"]
            std = idx.get((bt, f"std:{row['backend']}"))
            if std:
                row["time_vs_own_standard"] = v["median_s"] / std["median_s"]
                for lg in ligers:
                    lr = idx.get((bt, lg))
                    if lr:
                        row[f"standard_time_vs_{lg}"] = std["median_s"] / lr["median_s"]
            if floor:
                row["gemm_floor_fraction"] = floor["median_s"] / v["median_s"]
            floor_drv = idx.get((bt, "gemm_floor:vgs-driver"))
            if floor_drv:
                row["gemm_floor_driver_fraction"] = floor_drv["median_s"] / v["median_s"]
            if ref and ref.get("peak_bytes") and v.get("peak_bytes"):
                row["reference_mem_over_vgs"] = ref["peak_bytes"] / v["peak_bytes"]
                row["reference_time_over_vgs"] = ref["median_s"] / v["median_s"]
            rk = idx.get((bt, "torch_rkl"))
            if rk:
                row["time_vs_torch_rkl"] = v["median_s"] / rk["median_s"]
                if rk.get("peak_bytes") and v.get("peak_bytes"):
                    row["torch_rkl_mem_over_vgs"] = rk["peak_bytes"] / v["peak_bytes"]
            rows.append(row)
    targets = []
    mem_bt = MEM_TARGET_BT[dev]
    for row in rows:
        for lg in ligers:
            if f"time_vs_{lg}" in row:
                targets.append(_target("vgs_time_vs_liger", row, f"time_vs_{lg}", "<=", 2.0, lg))
            if f"mem_vs_{lg}" in row:
                targets.append(_target("vgs_mem_vs_liger", row, f"mem_vs_{lg}", "<=", 1.2, lg))
            if f"standard_time_vs_{lg}" in row:
                targets.append(_target("std_time_vs_liger", row, f"standard_time_vs_{lg}", "<=", 1.0, lg))
        if "gemm_floor_fraction" in row:
            targets.append(_target("gemm_floor_fraction", row, "gemm_floor_fraction", ">=", 0.65,
                                   "gemm_floor:vgs", applies=dev == "cuda"))
        if "gemm_floor_driver_fraction" in row:
            targets.append(_target("gemm_floor_fraction", row, "gemm_floor_driver_fraction", ">=", 0.65,
                                   "gemm_floor:vgs-driver", applies=dev == "cuda"))
        if "reference_mem_over_vgs" in row and row["bt"] == mem_bt:
            targets.append(_target("reference_mem_over_vgs", row, "reference_mem_over_vgs", ">=", 8.0, None))
        elif row["bt"] == mem_bt and row.get("peak_bytes"):
            # The reference did not run at the target B*T (RAM guard / OOM): extrapolate its peak
            # linearly in B*T (it holds O(B*T*V) logits) from the largest B*T it ran at, and say so.
            done = sorted(b for (b, c) in idx if c == "vgs:reference" and idx[(b, c)].get("peak_bytes"))
            if done:
                b0 = done[-1]
                est = idx[(b0, "vgs:reference")]["peak_bytes"] * mem_bt / b0
                row["reference_mem_over_vgs_extrapolated"] = est / row["peak_bytes"]
                row["reference_extrapolated_from_bt"] = b0
                t = _target("reference_mem_over_vgs", row, "reference_mem_over_vgs_extrapolated", ">=", 8.0, None)
                t["extrapolated_from_bt"] = b0
                targets.append(t)
    return {"rows": rows, "targets": targets, "target_definitions": TARGETS_DOC}


def _target(name, row, key, op, bound, anchor, applies=True) -> dict:
    value = row[key]
    met = value <= bound if op == "<=" else value >= bound
    return {"target": name, "bt": row["bt"], "backend": row["backend"], "anchor": anchor, "value": value,
            "bound": f"{op} {bound}", "met": bool(met), "binding": bool(applies)}


# ----------------------------------------------------------------------------- printing & plots
def print_tables(doc) -> str:
    idx = _index(doc)
    names = list(doc["cases"].keys())
    out = []
    head = ["B*T"] + names
    trows, mrows = [], []
    by = {(r["bt"], r["case"]): r for r in doc["results"]}
    for bt in doc["shapes"]["bt"]:
        tr, mr = [str(bt)], [str(bt)]
        for n in names:
            r = by.get((bt, n))
            ok = idx.get((bt, n))
            tr.append(C.fmt_time_n(ok["median_s"], C.repeats_of(ok)) if ok else (r["status"] if r else "-"))
            mr.append(C.fmt_bytes(ok.get("peak_bytes")) if ok else (r["status"] if r else "-"))
        trows.append(tr)
        mrows.append(mr)
    out.append(f"## Time, median fwd+bwd of n timed runs ({doc['device']['name']}, {doc['shapes']['dtype']})")
    out.append(C.table(trows, head))
    out.append(f"## Peak memory above inputs, one run per cell ({doc['memory_method']})")
    out.append(C.table(mrows, head))
    rrows = []
    for row in doc["ratios"]["rows"]:
        rrows.append([str(row["bt"]), row["backend"],
                      C.fmt_time_n(row["time_s"], row.get("n")),
                      C.fmt_ratio(row.get("time_vs_liger:chunked")), C.fmt_ratio(row.get("time_vs_liger:triton")),
                      _pct(row.get("gemm_floor_fraction")), _pct(row.get("gemm_floor_driver_fraction")),
                      C.fmt_ratio(row.get("mem_vs_liger:chunked")),
                      C.fmt_ratio(row.get("mem_vs_liger:triton")), _ref_mem(row),
                      C.fmt_ratio(row.get("time_vs_own_standard")),
                      C.fmt_ratio(row.get("standard_time_vs_liger:chunked"))])
    out.append("## Ratios (targets: time vs Liger <= 2.0x, our standard OPD vs Liger <= 1.0x; GEMM floor >= 65 % "
               "(GPU); memory vs Liger <= 1.2x; "
               f"reference memory / VGS >= 8x at B*T = {MEM_TARGET_BT[doc['device']['type']]})")
    out.append(C.table(rrows, ["B*T", "backend", "time (n)", "time/liger:chunked", "time/liger:triton", "GEMM floor frac",
                               "driver GEMM floor frac",
                               "mem/liger:chunked", "mem/liger:triton", "ref mem/VGS", "vgs/std (own)",
                               "std/liger:chunked"]))
    trs = doc["ratios"]["targets"]
    if trs:
        out.append("## Targets")
        out.append(C.table([[t["target"], str(t["bt"]), t["backend"], t["anchor"] or "-",
                             f"{t['value']:.3f}" + (f" (ref. extrapolated from B*T={t['extrapolated_from_bt']})"
                                                    if "extrapolated_from_bt" in t else ""), t["bound"],
                             ("met" if t["met"] else "MISSED") + ("" if t["binding"] else " (not binding here)")]
                            for t in trs], ["target", "B*T", "backend", "anchor", "value", "bound", "status"]))
    text = "\n\n".join(out)
    print(text, flush=True)
    return text


def _ref_mem(row):
    if row.get("reference_mem_over_vgs") is not None:
        return C.fmt_ratio(row["reference_mem_over_vgs"])
    if row.get("reference_mem_over_vgs_extrapolated") is not None:
        return (C.fmt_ratio(row["reference_mem_over_vgs_extrapolated"])
                + f" (ref. extrapolated from B*T={row['reference_extrapolated_from_bt']})")
    return "-"


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f} %"


def plots(doc, stem) -> list[str]:
    idx = _index(doc)
    bts = doc["shapes"]["bt"]
    names = list(doc["cases"].keys())
    t_series = {n: (bts, [idx[(b, n)]["median_s"] if (b, n) in idx else None for b in bts]) for n in names}
    m_series = {n: (bts, [idx[(b, n)]["peak_bytes"] / 2**20 if "peak_bytes" in idx.get((b, n), {}) else None
                          for b in bts])
                for n in names if not n.startswith("gemm_floor")}
    title = f"{doc['device']['name']}, {doc['shapes']['dtype']}, V={doc['shapes']['vocab']}, " \
            f"H_s={doc['shapes']['hidden_student']}, H_t={doc['shapes']['hidden_teacher']}"
    paths = []
    for suffix, series, ylabel in (("time", t_series, "fwd+bwd time, median (s)"),
                                   ("memory", m_series, "peak memory above inputs (MiB)")):
        p = C.save_plot(stem.with_name(f"{stem.name}-{suffix}.png"), title, "B*T (tokens)", ylabel, series)
        if p:
            paths.append(str(p.relative_to(C.REPO)) if p.is_relative_to(C.REPO) else str(p))
    return paths


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="CI-sized shapes and repeats")
    p.add_argument("--bts", type=int, nargs="+", help="B*T values (overrides the preset)")
    p.add_argument("--hs", type=int, help="student hidden size")
    p.add_argument("--ht", type=int, help="teacher hidden size")
    p.add_argument("--vocab", type=int, help="vocabulary (lm_head rows)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per B*T, the most timed runs of a case "
                   f"(default {FULL_REPEATS}; --quick {QUICK_REPEATS})")
    p.add_argument("--min-repeats", type=int, default=None, help="timed runs of a case before the budget may stop "
                   f"it (default {FULL_MIN_REPEATS}; --quick 1); capped at --repeats")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed runs per case before stopping "
                   "early (at least --min-repeats runs)")
    p.add_argument("--floor-chunk", type=int, help="row chunk of the GEMM floor (default 8192 GPU, 1024 CPU)")
    p.add_argument("--liger-compiled", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile in LigerFusedLinearJSDLoss (auto: on, except --quick on CPU)")
    p.add_argument("--cases", nargs="+", help="run only cases whose name contains one of these")
    p.add_argument("--skip-cases", nargs="+", help="case names not to run (exact)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--ram-fraction", type=float, default=RAM_FRACTION,
                   help="CPU: skip a case whose peak, extrapolated from a smaller B*T, exceeds this fraction "
                        "of the RAM available (default %(default)s)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--name", help="results file stem (default kernels-<device>[-quick])")
    p.add_argument("--note", action="append", help="free-text note stored in the JSON (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 1 when a case errors or runs out of memory, or a "
                   "binding target is missed (make gpu-check)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else FULL_REPEATS
    if args.budget is None:
        args.budget = 2.0 if args.quick else 30.0
    if args.min_repeats is None:
        args.min_repeats = 1 if args.quick else FULL_MIN_REPEATS
    args.min_repeats = min(args.min_repeats, args.repeats)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("# note: TRITON_INTERPRET is set; Triton cases run only on CUDA and are skipped on CPU", flush=True)
    t0 = time.perf_counter()
    from pathlib import Path

    device = C.pick_device(args.device)
    stem = args.name or f"kernels-{C.device_info(device)['slug']}" + ("-quick" if args.quick else "")
    path = Path(args.out_dir) / f"{stem}.json"
    doc = run(args, partial_path=path)
    doc["total_wall_s"] = time.perf_counter() - t0
    if not args.no_plots:
        doc["plots"] = plots(doc, path.with_suffix(""))
    doc["tables_markdown"] = print_tables(doc)
    C.write_json(path, doc)
    print(f"\nwrote {path}" + (f" and {', '.join(doc.get('plots', []))}" if doc.get("plots") else ""), flush=True)
    bad = [f"{r['case']} at B*T={r['bt']}: {r['status']}" for r in doc["results"] if r.get("status") in ("error", "oom")]
    bad += [f"target {t['target']} ({t['backend']}, B*T={t['bt']}): {t['value']:.3f} not {t['bound']}"
            for t in doc["ratios"]["targets"] if t["binding"] and not t["met"]]
    if args.strict and bad:
        print("FAILED (--strict):\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
