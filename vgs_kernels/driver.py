"""The two-pass VGS driver shared by every backend (docs/kernels.md); the row sources it reads from are
in :mod:`vgs_kernels.sources`, the GEMMs in :mod:`vgs_kernels.gemm`, the chunk sizes in
:mod:`vgs_kernels.chunks`.

Pass 1 walks the valid rows in chunks, computes the four KLs per row and the gradients of every
term whose coefficient does not depend on the VDS gate. The gate needs a quantile over the whole
batch (all ranks), so the gated terms are settled in pass 2, on the rows that need it. In
``mode="vgs"`` (the language term is the only gated one) pass 1 predicts the gate from the VDS seen
so far and sends on the language gradient of the predicted rows, which it has in hand; pass 2 then
corrects only the mispredicted rows (a few percent; none with a fixed ``threshold`` or a caller's
``gate``, which pass 1 uses as the prediction). The fused-linear path runs, per row:

* pass 1: 4 forward GEMMs (zs, zsp, zt, ztp) + 2 backward GEMMs for zs (grad_h, grad_W), and 2 for
  zsp on the predicted rows (~30 %);
* pass 2 (mispredicted rows only): 2 forward GEMMs (zsp, ztp) + 2 backward GEMMs for zsp.

That is 6 + 2 * 0.3 + 4 * (a few %) GEMMs per row at the default quantile: the minimal set plus
the corrections, against 7.2 for recomputing every gated row in pass 2 and 8.6 for a design that
runs a teacher-only VDS pre-pass first (2 + 4 + 2 + 0.6). In ``adaptive`` / ``language`` modes
pass 2 recomputes the gated rows (their gated terms touch all four streams).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from . import hooks, modes
from .modes import TERMS
from .options import VGSOptions
from .threshold import gate_and_ramp, quantiles

RowsFn = Callable[..., torch.Tensor]
STREAMS = ("s", "sp", "t", "tp")
Rows = slice | torch.Tensor  # a contiguous range of rows, or sorted unique row indices [n] (long)


@dataclass
class GradPart:
    """Logit gradients of one student stream for some rows: ``grad`` [n, width], or its rows
    ``select`` ([k] long) when given, belong to the source's rows ``rows`` (n or k of them)."""

    rows: Rows
    stream: str
    grad: torch.Tensor
    select: torch.Tensor | None = None

    def gradient(self) -> torch.Tensor:
        return self.grad if self.select is None else self.grad.index_select(0, self.select)


class RowSource(Protocol):
    """Where the driver reads logit rows from and sends their gradients to.

    The driver passes ``rows`` as a ``slice`` when the chunk is a contiguous range of the source's
    rows (every row valid: no gather), else as a sorted long tensor of row indices.
    """

    rows: int  # N, the number of rows (valid_idx indexes them)
    vocab: int  # ids [0, vocab) count; logits columns [vocab, width) are padding the row kernel masks
    width: int  # length of the logit rows handed to the row kernel (>= vocab)
    wants: frozenset[str]  # student streams ('s', 'sp') whose logit gradients are used

    def logits(self, rows: Rows, streams: tuple[str, ...]) -> list[torch.Tensor]:
        """[n, width] logits of the requested streams ('s', 'sp', 't', 'tp') for ``rows``; valid
        until the next call (a source may reuse its buffers)."""

    def grad_buffer(self, stream: str, logits: torch.Tensor) -> torch.Tensor:
        """The [n, width] tensor the row kernel writes dL/dlogits of ``stream`` into, given that
        stream's ``logits`` from the current chunk: ``logits`` itself (in place) or a new tensor."""

    def backward(self, parts: list[GradPart], scale: float) -> None:
        """Accumulate ``grad / scale`` of each part (``grad``: a ``grad_buffer`` holding dL/dlogits
        times the power of two ``scale``, or its rows ``select`` when given) into student stream 's'
        or 'sp' (one of ``wants``) for ``rows``. The parts of one call belong to one chunk: a source
        may run them as one GEMM."""

    def release(self) -> None:
        """Free per-chunk work buffers (called when the driver is done)."""


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


def grad_scale(coef: torch.Tensor, dtype: torch.dtype) -> float:
    """The power of two the row kernel multiplies a chunk's logit gradients by before rounding them
    to ``dtype``: 1 except for fp16, where it brings the largest per-row sum of |coefficients|
    into [1, 2) (coefficients ~1/N would push fp16 gradients into underflow; an exact power of two
    is undone exactly in the fp32 accumulation)."""
    if dtype != torch.float16 or coef.numel() == 0:
        return 1.0
    peak = float(coef.abs().sum(dim=1).max())
    if not (peak > 0 and math.isfinite(peak)):
        return 1.0
    return 2.0 ** -math.floor(math.log2(peak))


def gated_rows(coef2: torch.Tensor) -> torch.Tensor:
    """Indices (into the valid rows) of the rows with a non-zero gated coefficient, sorted."""
    return (coef2 != 0).any(dim=1).nonzero().squeeze(1)


def run_vgs(
    source: RowSource,
    valid_idx: torch.Tensor,
    weights: torch.Tensor,
    opts: VGSOptions,
    rows_fn: RowsFn,
    chunk_size: int,
    need_grad: bool,
    gate: torch.Tensor | None = None,
) -> DriverResult:
    """Run both passes over the rows ``valid_idx`` ([n_valid] long) with reduction ``weights``.

    With ``need_grad``, the logit gradients of the student streams in ``source.wants`` are computed
    and sent to ``source.backward``; the other stream's are never formed. ``rows_fn`` follows the
    row contract of :mod:`vgs_kernels.backends.torch_rows` (called with ``vocab=source.vocab``
    and gradient buffers from ``source.grad_buffer``, which may be the logits themselves): gradients are
    written in the logits' dtype, fp32 math inside the row kernels. ``gate`` ([n_valid] {0, 1}): the
    caller's gate instead of the thresholded VDS. The coefficients of each pass come from the mode's row
    of ``vgs_kernels.modes``.

    Predicted gate (a mode whose only gated term is the language term and whose steered term is the
    visual one, i.e. ``mode="vgs"``; ``detach_target_prior=True``; the text stream trainable): the
    gated language term needs the batch's VDS quantile, known only after pass 1. Pass 1 therefore
    also writes the ungated language gradient of every row into the text stream's buffer and sends
    on at once the rows whose VDS exceeds the quantile of the VDS seen so far (this rank's rows;
    exact with a fixed ``threshold`` or a caller's ``gate``, which is then the prediction); pass 2
    only corrects the rows whose final gate differs from that prediction (+beta w where gated but
    not predicted, -beta w where predicted but not gated; ``w`` carries the reduction weights,
    token ``weights`` and gamma), recomputing their logits. The sum is exactly the gated term;
    typically a few percent of the rows are corrected instead of recomputing the 30 % gated ones.
    """
    n = valid_idx.numel()
    device = valid_idx.device
    w = weights * opts.gamma
    m = modes.get(opts.mode)
    alpha, beta = opts.alpha, opts.beta
    coef1 = modes.coefficients(m, alpha, beta, w)
    # the text stream's gradient in pass 1: its steered language term, or the target prior's gradient (r - p)
    # through an ungated visual term
    grad_sp_in_pass1 = m.steered == "lang" or (m.steered == "vis" and not m.ramped and not opts.detach_target_prior)
    want_s = need_grad and "s" in source.wants
    want_sp = need_grad and "sp" in source.wants and grad_sp_in_pass1
    predict = (need_grad and m.gated_lang_only and m.steered == "vis" and opts.detach_target_prior
               and "sp" in source.wants and beta != 0)
    # the row kernel's coefficients in pass 1: with a predicted gate, also the ungated language term
    kernel_coef1 = coef1
    if predict:
        kernel_coef1 = coef1.clone()
        kernel_coef1[:, TERMS.index("lang")] = beta * w
    predicted = torch.zeros(n, device=device) if predict else None
    # every row valid: valid_idx is arange(N) (sorted, unique), so chunks are slices (no gathers)
    all_rows = n == source.rows

    stats = torch.empty(n, 4, device=device)
    try:
        for a, b in _chunks(n, chunk_size):
            if hooks.active():
                hooks.emit("chunk", pass_=1, rows=b - a, chunk_size=chunk_size)
            rows = slice(a, b) if all_rows else valid_idx[a:b]
            zs, zsp, zt, ztp = source.logits(rows, STREAMS)
            g_s = source.grad_buffer("s", zs) if want_s else None
            g_sp = source.grad_buffer("sp", zsp) if want_sp or predict else None
            c = kernel_coef1[a:b]
            grads = [g for g in (g_s, g_sp) if g is not None]
            scale = grad_scale(c, grads[0].dtype) if grads else 1.0
            stats[a:b] = _call_rows(
                rows_fn, zs, zsp, zt, ztp, c * scale if scale != 1.0 else c, temperature=opts.temperature,
                detach_target_prior=opts.detach_target_prior, grad_zs=g_s, grad_zsp=g_sp, vocab=source.vocab,
            )
            parts = [GradPart(rows, "s", g_s)] if g_s is not None else []
            if want_sp:
                parts.append(GradPart(rows, "sp", g_sp))
            elif predict:
                if gate is None:
                    pick = predicted_rows(stats[a:b, 3], _running_threshold(stats[:b, 3], opts))
                else:  # the caller's gate is the final one: an exact prediction, nothing to correct
                    pick = (gate[a:b] != 0).nonzero().squeeze(1)
                predicted[a + pick] = 1.0
                if pick.numel():
                    picked = (torch.arange(a, b, device=device) if all_rows else rows).index_select(0, pick)
                    parts.append(GradPart(picked, "sp", g_sp, pick))
            if parts:
                source.backward(parts, scale)
            del zs, zsp, zt, ztp, g_s, g_sp

        gate, ramp, theta = gate_and_ramp(stats[:, 3], opts, gate)
        coef2 = modes.coefficients(m, alpha, beta, w, gate, ramp)
        coef = coef1 + coef2

        if need_grad and m.gated:
            # with a predicted gate, pass 2 corrects the mispredicted rows only (signed coefficients)
            zeros = torch.zeros_like(w)
            fix = torch.stack([zeros, zeros, beta * (gate - predicted) * w], dim=1) if predict else coef2
            _gated_pass(source, valid_idx, fix, opts, rows_fn, chunk_size)
    finally:
        source.release()

    terms = coef * stats[:, :3]
    terms = torch.where(coef != 0, terms, torch.zeros_like(terms))
    loss = terms.sum()
    return DriverResult(loss=loss, stats=stats, gate=gate, ramp=ramp, theta=theta, per_row=terms.sum(1))


def _call_rows(rows_fn, zs, zsp, zt, ztp, coef, **kw) -> torch.Tensor:
    """``rows_fn`` on one chunk, reported to ``vgs_kernels.hooks`` (when observed)."""
    if hooks.active():
        two = zs is zsp and zt is ztp
        module = getattr(rows_fn, "__module__", "")
        # a function by its dotted name; the extension's operator as torch names it (vgs_kernels.vgs_rows.default)
        kernel = str(rows_fn) if module.startswith("torch._ops") else f"{module}.{rows_fn.__qualname__}"
        hooks.emit("rows", kernel=kernel, rows=zs.shape[0],
                   width=zs.shape[1], vocab=kw.get("vocab"), dtype=str(zs.dtype), streams=2 if two else 4,
                   grads=sum(kw.get(k) is not None for k in ("grad_zs", "grad_zsp")))
    return rows_fn(zs, zsp, zt, ztp, coef, **kw)


def _running_threshold(vds_so_far: torch.Tensor, opts: VGSOptions) -> float:
    """The gate threshold predicted from this rank's VDS values seen so far (the fixed one if given)."""
    if opts.threshold is not None:
        return float(opts.threshold)
    return quantiles(vds_so_far, [opts.quantile])[0]


def predicted_rows(vds: torch.Tensor, theta: float) -> torch.Tensor:
    """Indices (within the chunk) of the rows whose VDS exceeds the predicted threshold, sorted."""
    return (vds > theta).nonzero().squeeze(1)


def _gated_pass(source, valid_idx, coef2, opts, rows_fn, chunk_size) -> None:
    """Pass 2: gradients of the gated terms, on the rows whose gated coefficient is non-zero."""
    lang_only = modes.get(opts.mode).gated_lang_only  # only beta*gate*lang: d/dzsp of KL(p'||q') alone
    want_s, want_sp = "s" in source.wants, "sp" in source.wants
    if lang_only and not want_sp:
        return
    rows = gated_rows(coef2)
    if rows.numel() == 0:
        return
    idx_all = valid_idx[rows]
    coef2 = coef2[rows]
    for a, b in _chunks(rows.numel(), chunk_size):
        if hooks.active():
            hooks.emit("chunk", pass_=2, rows=b - a, chunk_size=chunk_size)
        idx = idx_all[a:b]
        if lang_only:
            # KL(p'||q') is the 'std' KL of the row function fed (zsp, ztp) as (zs, zt).
            zsp, ztp = source.logits(idx, ("sp", "tp"))
            g = source.grad_buffer("sp", zsp)
            c = coef2[a:b, [2, 0, 0]]  # c_std := c_lang, c_vis = c_lang' = 0
            scale = grad_scale(c, g.dtype)
            _call_rows(rows_fn, zsp, zsp, ztp, ztp, c * scale if scale != 1.0 else c, temperature=opts.temperature,
                       detach_target_prior=True, grad_zs=g, grad_zsp=None, vocab=source.vocab)
            source.backward([GradPart(idx, "sp", g)], scale)
            continue
        needs_sp = want_sp and (bool((coef2[a:b, 2] != 0).any()) or not opts.detach_target_prior)
        if not (want_s or needs_sp):
            continue
        zs, zsp, zt, ztp = source.logits(idx, STREAMS)
        g_s = source.grad_buffer("s", zs) if want_s else None
        g_sp = source.grad_buffer("sp", zsp) if needs_sp else None
        c = coef2[a:b]
        scale = grad_scale(c, (g_s if g_s is not None else g_sp).dtype)
        _call_rows(rows_fn, zs, zsp, zt, ztp, c * scale if scale != 1.0 else c, temperature=opts.temperature,
                   detach_target_prior=opts.detach_target_prior, grad_zs=g_s, grad_zsp=g_sp, vocab=source.vocab)
        source.backward([GradPart(idx, k, g) for k, g in (("s", g_s), ("sp", g_sp)) if g is not None], scale)
