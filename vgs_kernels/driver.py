"""The two-pass VGS driver shared by every backend, and the two row sources it reads from.

Pass 1 walks the valid rows in chunks, computes the four KLs per row and the gradients of every
term whose coefficient does not depend on the VDS gate. The gate needs a quantile over the whole
batch (all ranks), so the gated terms get their gradients in pass 2, which revisits only the rows
whose gated coefficient is non-zero (about 30 %). In ``mode="vgs"`` pass 2 needs only the text-only
streams (the language term), so the fused-linear path runs, per row:

* pass 1: 4 forward GEMMs (zs, zsp, zt, ztp) + 2 backward GEMMs for zs (grad_h, grad_W);
* pass 2 (gated rows only): 2 forward GEMMs (zsp, ztp) + 2 backward GEMMs for zsp.

That is 6 + 4 * 0.3 = 7.2 GEMMs per row at the default quantile, against 8.6 for a design that
runs a teacher-only VDS pre-pass first and then everything (2 + 4 + 2 + 0.6).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .options import VGSOptions
from .threshold import gate_and_ramp

RowsFn = Callable[..., torch.Tensor]
STREAMS = ("s", "sp", "t", "tp")


class RowSource(Protocol):
    """Where the driver reads logit rows from and sends their gradients to."""

    vocab: int
    wants: frozenset[str]  # student streams ('s', 'sp') whose logit gradients are used

    def logits(self, idx: torch.Tensor, streams: tuple[str, ...]) -> list[torch.Tensor]:
        """[n, vocab] logits of the requested streams ('s', 'sp', 't', 'tp') for rows ``idx``."""

    def backward(self, idx: torch.Tensor, stream: str, grad: torch.Tensor) -> None:
        """Accumulate dL/dlogits ([n, vocab]; fp32, fp64 for fp64 inputs) of student stream 's' or
        'sp' (one of ``wants``) for rows idx."""


@dataclass
class DriverResult:
    loss: torch.Tensor  # 0-d fp32
    stats: torch.Tensor  # [n_valid, 4] fp32: std, vis, lang, vds
    gate: torch.Tensor  # [n_valid] fp32 {0, 1}
    ramp: torch.Tensor | None  # [n_valid] fp32 in [0, 1] (adaptive only)
    theta: float
    per_row: torch.Tensor | None = None  # [n_valid]: each row's coefficient-weighted objective (sums to loss)


def reduction_weights(
    mask: torch.Tensor,
    reduction: str,
    weights: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """mask [B, T] bool -> per-valid-token weights [n_valid] fp32 (row-major order).

    ``sequence``: 1 / (valid tokens of its sequence * sequences with a valid token);
    ``token``: 1 / valid tokens; ``sum`` and ``none``: 1. Each is multiplied by the token's
    ``weights`` entry ([B, T] fp32) when given. A sequence is a row of ``mask``, or, with
    ``cu_seqlens`` ([S + 1] long) and a [1, N] mask of packed rows, the span cu[s]:cu[s + 1].
    """
    flat = mask.reshape(-1)
    extra = None if weights is None else weights.reshape(-1)[flat]
    if cu_seqlens is None:
        counts = mask.sum(dim=1)
        seq_of_valid = None
    else:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=mask.device), lengths)
        seq_of_valid = seq_id[flat]
        counts = torch.bincount(seq_of_valid, minlength=lengths.numel())
    n_valid = int(counts.sum().item())
    if n_valid == 0:
        return torch.zeros(0, device=mask.device)
    if reduction in ("sum", "none"):
        base = torch.ones(n_valid, device=mask.device)
    elif reduction == "token":
        base = torch.full((n_valid,), 1.0 / n_valid, device=mask.device)
    else:
        n_seq = int((counts > 0).sum().item())
        per_seq = 1.0 / (counts.clamp_min(1).double() * n_seq)
        if seq_of_valid is None:
            base = per_seq[:, None].expand_as(mask)[mask].float()
        else:
            base = per_seq[seq_of_valid].float()
    return base if extra is None else base * extra


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def run_vgs(
    source: RowSource,
    valid_idx: torch.Tensor,
    weights: torch.Tensor,
    opts: VGSOptions,
    rows_fn: RowsFn,
    chunk_size: int,
    need_grad: bool,
    compute_dtype: torch.dtype = torch.float32,
    gate: torch.Tensor | None = None,
) -> DriverResult:
    """Run both passes over the rows ``valid_idx`` ([n_valid] long) with reduction ``weights``.

    With ``need_grad``, the logit gradients of the student streams in ``source.wants`` are computed
    (in ``compute_dtype``) and sent to ``source.backward``; the other stream's are never formed.
    ``gate`` ([n_valid] {0, 1}): the caller's gate instead of the thresholded VDS.
    """
    n = valid_idx.numel()
    device = valid_idx.device
    w = weights * opts.gamma
    zeros = torch.zeros_like(w)
    mode, alpha, beta = opts.mode, opts.alpha, opts.beta
    c_std = w
    c_vis = alpha * w if mode == "vgs" else zeros
    c_lang = alpha * w if mode == "language" else zeros
    coef1 = torch.stack([c_std, c_vis, c_lang], dim=1)
    grad_sp_in_pass1 = mode == "language" or (mode == "vgs" and not opts.detach_target_prior)
    want_s = need_grad and "s" in source.wants
    want_sp = need_grad and "sp" in source.wants

    stats = torch.empty(n, 4, device=device)
    for a, b in _chunks(n, chunk_size):
        idx = valid_idx[a:b]
        zs, zsp, zt, ztp = source.logits(idx, STREAMS)
        g_s = torch.empty(zs.shape, device=device, dtype=compute_dtype) if want_s else None
        g_sp = torch.empty(zsp.shape, device=device, dtype=compute_dtype) if want_sp and grad_sp_in_pass1 else None
        stats[a:b] = rows_fn(
            zs, zsp, zt, ztp, coef1[a:b], temperature=opts.temperature,
            detach_target_prior=opts.detach_target_prior, grad_zs=g_s, grad_zsp=g_sp,
        )
        del zs, zsp, zt, ztp
        if g_s is not None:
            source.backward(idx, "s", g_s)
        if g_sp is not None:
            source.backward(idx, "sp", g_sp)
        del g_s, g_sp

    gate, ramp, theta = gate_and_ramp(stats[:, 3], opts, gate)
    if mode == "vgs":
        coef2 = torch.stack([zeros, zeros, beta * gate * w], dim=1)
    elif mode == "adaptive":
        coef2 = torch.stack([zeros, alpha * ramp * w, beta * gate * w], dim=1)
    elif mode == "language":
        coef2 = torch.stack([zeros, beta * gate * w, zeros], dim=1)
    else:
        coef2 = torch.zeros_like(coef1)
    coef = coef1 + coef2

    if need_grad and mode != "standard":
        _gated_pass(source, valid_idx, coef2, opts, rows_fn, chunk_size, compute_dtype)

    terms = coef * stats[:, :3]
    terms = torch.where(coef != 0, terms, torch.zeros_like(terms))
    loss = terms.sum()
    return DriverResult(loss=loss, stats=stats, gate=gate, ramp=ramp, theta=theta, per_row=terms.sum(1))


def _gated_pass(source, valid_idx, coef2, opts, rows_fn, chunk_size, compute_dtype) -> None:
    """Pass 2: gradients of the gated terms, on the rows whose gated coefficient is non-zero."""
    rows = (coef2 != 0).any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    idx_all = valid_idx[rows]
    coef2 = coef2[rows]
    lang_only = opts.mode == "vgs"  # only beta*gate*lang: d/dzsp of KL(p'||q') alone
    want_s, want_sp = "s" in source.wants, "sp" in source.wants
    if lang_only and not want_sp:
        return
    device = valid_idx.device
    for a, b in _chunks(rows.numel(), chunk_size):
        idx = idx_all[a:b]
        if lang_only:
            # KL(p'||q') is the 'std' KL of the row function fed (zsp, ztp) as (zs, zt).
            zsp, ztp = source.logits(idx, ("sp", "tp"))
            g = torch.empty(zsp.shape, device=device, dtype=compute_dtype)
            c = coef2[a:b, [2, 0, 0]]  # c_std := c_lang, c_vis = c_lang' = 0
            rows_fn(zsp, zsp, ztp, ztp, c, temperature=opts.temperature,
                    detach_target_prior=True, grad_zs=g, grad_zsp=None)
            source.backward(idx, "sp", g)
            continue
        needs_sp = want_sp and (bool((coef2[a:b, 2] != 0).any()) or not opts.detach_target_prior)
        if not (want_s or needs_sp):
            continue
        zs, zsp, zt, ztp = source.logits(idx, STREAMS)
        g_s = torch.empty(zs.shape, device=device, dtype=compute_dtype) if want_s else None
        g_sp = torch.empty(zsp.shape, device=device, dtype=compute_dtype) if needs_sp else None
        rows_fn(zs, zsp, zt, ztp, coef2[a:b], temperature=opts.temperature,
                detach_target_prior=opts.detach_target_prior, grad_zs=g_s, grad_zsp=g_sp)
        if g_s is not None:
            source.backward(idx, "s", g_s)
        if g_sp is not None:
            source.backward(idx, "sp", g_sp)


class LogitsSource:
    """Rows of four materialised [N, V] logit tensors; gradients go to [N, V] buffers.

    Gradient buffers are in the logits' dtype, allocated on the first gradient of each stream;
    ``needs`` (s, sp) says which student streams want one (a frozen stream gets none).
    """

    def __init__(self, zs, zsp, zt, ztp, vocab: int, needs: tuple[bool, bool] = (True, True)):
        self.vocab = vocab
        self.wants = frozenset(k for k, need in zip(("s", "sp"), needs) if need)
        self.full = {"s": zs, "sp": zsp, "t": zt, "tp": ztp}
        self.views = {k: v[:, :vocab] for k, v in self.full.items()}
        self.grads: dict[str, torch.Tensor] = {}

    def logits(self, idx, streams):
        span = _as_slice(idx)
        if span is not None:  # contiguous rows (the common all-valid case): views, no copy
            return [self.views[k][span] for k in streams]
        return [self.views[k].index_select(0, idx) for k in streams]

    def backward(self, idx, stream, grad):
        if stream not in self.grads:
            self.grads[stream] = torch.zeros_like(self.full[stream])
        buf = self.grads[stream][:, : self.vocab]
        span = _as_slice(idx)
        if span is not None:
            buf[span] += grad.to(buf.dtype)
        else:
            buf.index_add_(0, idx, grad.to(buf.dtype))


def _as_slice(idx: torch.Tensor) -> slice | None:
    """``idx`` (sorted, unique row indices) as a slice when it is a contiguous range."""
    if idx.numel() == 0:
        return None
    lo, hi = (int(x) for x in idx[[0, -1]].tolist())
    return slice(lo, hi + 1) if hi + 1 - lo == idx.numel() else None


class LinearSource:
    """Rows computed on demand as hidden @ weight.T (+ bias) from [N, H] hidden states.

    Gradients of the student hidden states are accumulated in fp32 [N, H] buffers, of the student
    weight and bias in fp32 [V, H] / [V] buffers; only rows ``[:vocab]`` of the weight are read.
    ``needs`` = (hs, hsp, ws, bs) says which of them want a gradient: nothing is allocated or
    computed for the others (a frozen lm_head costs no [V, H] buffer and no weight-gradient GEMM).
    """

    def __init__(self, hs, hsp, ws, bs, ht, htp, wt, bt, vocab: int, needs: tuple[bool, bool, bool, bool],
                 alias_text: bool = False):
        self.vocab = vocab
        need_hs, need_hsp, need_w, need_b = needs
        need_b = need_b and bs is not None
        # alias_text: the text streams are the image streams (standard mode without the text view):
        # their logits are the image streams' (no GEMM) and they never get a gradient
        self.alias = {"sp": "s", "tp": "t"} if alias_text else {}
        self.need_hidden = {"s": need_hs, "sp": need_hsp and not alias_text}
        # the logit gradients of both streams feed the weight and bias gradients
        self.wants = frozenset(k for k, h in self.need_hidden.items()
                               if k not in self.alias and (h or need_w or need_b))
        self.hidden = {"s": hs, "sp": hsp, "t": ht, "tp": htp}
        ws_v, wt_v = ws[:vocab], wt[:vocab]
        bs_v = bs[:vocab] if bs is not None else None
        bt_v = bt[:vocab] if bt is not None else None
        self.weight = {"s": ws_v, "sp": ws_v, "t": wt_v, "tp": wt_v}
        self.bias = {"s": bs_v, "sp": bs_v, "t": bt_v, "tp": bt_v}
        self.student_weight, self.student_bias = ws, bs
        self.grad_hidden: dict[str, torch.Tensor] = {}
        self.grad_weight = torch.zeros(ws.shape, device=ws.device) if need_w else None
        self.grad_bias = torch.zeros(bs.shape, device=bs.device) if need_b else None

    def logits(self, idx, streams):
        out: dict[str, torch.Tensor] = {}
        for k in streams:
            src = self.alias.get(k, k)
            if src not in out:
                out[src] = F.linear(self.hidden[src].index_select(0, idx), self.weight[src], self.bias[src])
        return [out[self.alias.get(k, k)] for k in streams]

    def backward(self, idx, stream, grad):
        h = self.hidden[stream]
        w = self.weight[stream]
        if self.need_hidden[stream]:
            if stream not in self.grad_hidden:
                self.grad_hidden[stream] = torch.zeros(h.shape, device=h.device)
            self.grad_hidden[stream].index_add_(0, idx, (grad.to(w.dtype) @ w).float())
        if self.grad_weight is not None:
            rows = h.index_select(0, idx)
            if rows.dtype == torch.float32:
                self.grad_weight[: self.vocab].addmm_(grad.t(), rows)
            else:
                self.grad_weight[: self.vocab] += mm_fp32(grad.t(), rows)
        if self.grad_bias is not None:
            self.grad_bias[: self.vocab] += grad.sum(0).float()


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as an fp32 tensor, for a (the logit gradient, fp32 or fp64) and b (hidden rows).

    On CUDA with a bf16/fp16 ``b``, ``a`` is first rounded to ``b``'s dtype (so the GEMM runs
    on the tensor cores) and the product is accumulated and returned in fp32, never rounded to
    bf16/fp16 (``torch.mm(..., out_dtype=torch.float32)``; on a torch without that overload the
    same rounded operands are upcast and multiplied in fp32). Elsewhere both operands are upcast
    to fp32 unrounded and multiplied in fp32.
    """
    if a.is_cuda and b.dtype in (torch.bfloat16, torch.float16):
        return _mm_low_precision_fp32_out(a.to(b.dtype), b)
    return a.float() @ b.float()


# Whether torch.mm(..., out_dtype=) works here (added around torch 2.8): None until the first call.
_mm_out_dtype_ok: bool | None = None


def _mm_low_precision_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of two bf16/fp16 tensors with an fp32 result: ``torch.mm(out_dtype=fp32)`` when this
    torch has it, else ``a.float() @ b.float()`` (decided on the first call, then cached)."""
    global _mm_out_dtype_ok
    if _mm_out_dtype_ok is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError) as exc:
            # once the overload has worked, or when out of memory, a failure is a real error
            if _mm_out_dtype_ok or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            _mm_out_dtype_ok = False
        else:
            _mm_out_dtype_ok = True
            return out
    return a.float() @ b.float()


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, temps: int = 16) -> int:
    """Rows per chunk: as many as fit ``temps`` fp32 [chunk, vocab] buffers in the budget (a quarter
    of free memory up to 1 GiB on CUDA, 256 MiB on CPU), and at most half the rows, so the fused
    path never holds the logits of the whole batch."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, 2**30)
    else:
        budget = 256 * 2**20
    cap = max(1, budget // (vocab * 4 * temps))
    return max(1, min(cap, math.ceil(n_rows / 2)))
