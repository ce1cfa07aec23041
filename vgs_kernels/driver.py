"""The two-pass VGS driver shared by every backend, and the two row sources it reads from
(docs/kernels.md).

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

Memory per chunk of ``c`` rows (``LinearSource``): one [c, W] logits buffer per stream in the
hidden states' dtype, reused from chunk to chunk; the row kernel writes each logit gradient in
place into its stream's buffer (in that dtype), so a chunk holds no gradient buffer and no fp32
copy of the logits. The image stream's buffer has room for c / 2 more rows: the text stream's
gradient rows of the chunk, when they fit (the ~30 % predicted-gated ones of pass 1), are stacked
there, so that one GEMM per chunk accumulates the weight gradient of both streams ([g_s; g_sp]^T [h_s; h_sp]: the fp32 [V, H]
accumulator is read and written once per chunk, not twice). The GEMMs run on the full rows of the lm_head weights (W = their row count, e.g. 151936
for Qwen), the row kernels mask the ids [vocab_size, W). The weight gradient is accumulated in
place into one fp32 [V, H] buffer (never a weight-sized temporary per chunk). fp16 gradients are
scaled by a power of two before they are rounded (the per-row coefficients, ~1/N, would make them
underflow) and the scale is undone where the gradient is accumulated (the fp32 hidden / weight
gradients of ``LinearSource``; ``LogitsSource``'s buffers in the logits' dtype).
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
        hooks.emit("rows", backend=getattr(rows_fn, "__module__", "?").rsplit(".", 1)[-1], rows=zs.shape[0],
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


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows of ``x``: a view for a slice, a gathered copy for indices."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


class LogitsSource:
    """Rows of four materialised [N, V] logit tensors; gradients go to [N, V] buffers.

    Gradient buffers are in the logits' dtype, allocated on the first gradient of each stream;
    ``needs`` (s, sp) says which student streams want one (a frozen stream gets none). The row
    kernel writes each chunk's gradient into a new [n, width] tensor of the logits' dtype (the
    logits are the caller's, never overwritten).
    """

    def __init__(self, zs, zsp, zt, ztp, vocab: int, needs: tuple[bool, bool] = (True, True)):
        self.rows = zs.shape[0]
        self.vocab = vocab
        self.width = min(zs.shape[1], zt.shape[1])
        self.wants = frozenset(k for k, need in zip(("s", "sp"), needs) if need)
        self.full = {"s": zs, "sp": zsp, "t": zt, "tp": ztp}
        self.views = {k: v[:, : self.width] for k, v in self.full.items()}
        self.grads: dict[str, torch.Tensor] = {}

    def logits(self, rows, streams):
        return [_take(self.views[k], rows) for k in streams]

    def grad_buffer(self, stream, logits):
        return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)

    def backward(self, parts, scale):
        for part in parts:
            if part.stream not in self.grads:
                self.grads[part.stream] = torch.zeros_like(self.full[part.stream])
            buf = self.grads[part.stream][:, : self.width]
            grad = part.gradient().to(buf.dtype)
            if isinstance(part.rows, slice):
                buf[part.rows].add_(grad, alpha=1.0 / scale)
            else:
                buf.index_add_(0, part.rows, grad, alpha=1.0 / scale)

    def release(self):
        pass


class LinearSource:
    """Rows computed on demand as hidden @ weight.T (+ bias) from [N, H] hidden states.

    The logits of a chunk are computed on the full rows of the weights (``width`` = the smaller
    of the two heads' row counts, >= vocab) into one [chunk, width] buffer per stream, in the
    hidden states' dtype, reused from chunk to chunk; the logit gradients are written in place
    into those buffers (``grad_buffer`` returns the logits). Gradients of the student hidden
    states are accumulated in fp32 [N, H] buffers, of the student weight and bias in fp32 [V, H] /
    [V] buffers, in place (rows [width, V) stay 0). ``needs`` = (hs, hsp, ws, bs) says which of
    them want a gradient: nothing is allocated or computed for the others (a frozen lm_head costs
    no [V, H] buffer and no weight-gradient GEMM).
    """

    def __init__(self, hs, hsp, ws, bs, ht, htp, wt, bt, vocab: int, needs: tuple[bool, bool, bool, bool],
                 alias_text: bool = False):
        self.rows = hs.shape[0]
        self.vocab = vocab
        self.width = width = min(ws.shape[0], wt.shape[0])
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
        ws_v, wt_v = ws[:width], wt[:width]
        bs_v = bs[:width] if bs is not None else None
        bt_v = bt[:width] if bt is not None else None
        self.weight = {"s": ws_v, "sp": ws_v, "t": wt_v, "tp": wt_v}
        self.bias = {"s": bs_v, "sp": bs_v, "t": bt_v, "tp": bt_v}
        self.student_weight, self.student_bias = ws, bs
        self.grad_hidden: dict[str, torch.Tensor] = {}
        # the first weight-gradient GEMM writes the accumulator (beta = 0): no [V, H] zero fill, no first read
        self._grad_weight = torch.empty(ws.shape, device=ws.device) if need_w else None
        self._weight_written = False
        self.grad_bias = torch.zeros(bs.shape, device=bs.device) if need_b else None
        self._work: dict[str, torch.Tensor] = {}  # stream -> [capacity, width] logits buffer
        self._current: dict[str, torch.Tensor] = {}  # stream -> the current chunk's view of it
        # both student streams get gradients: their weight-gradient GEMMs are stacked (see backward)
        self.combine = {"s", "sp"} <= self.wants and (need_w or need_b)

    def _buffer(self, stream: str, n: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._work.get(stream)
        # the image stream's buffer has room for half a chunk of rows below the first: the text
        # stream's gradient rows of the chunk go there when they fit (the ~30 % predicted-gated rows
        # of pass 1), so that both streams' weight gradient is one GEMM
        rows = n + self.spare_rows(n) if stream == "s" and self.combine else n
        if buf is None or buf.shape[0] < rows:
            self._work.pop(stream, None)  # free the smaller buffer first
            buf = self._work[stream] = torch.empty(rows, self.width, device=like.device, dtype=like.dtype)
        return buf[:n]

    def logits(self, rows, streams):
        out: dict[str, torch.Tensor] = {}
        for k in streams:
            src = self.alias.get(k, k)
            if src not in out:
                h = _take(self.hidden[src], rows)
                buf = self._buffer(src, h.shape[0], h)
                w, b = self.weight[src], self.bias[src]
                if b is None:
                    torch.mm(h, w.t(), out=buf)
                else:
                    torch.addmm(b, h, w.t(), out=buf)
                out[src] = buf
        self._current = out
        return [out[self.alias.get(k, k)] for k in streams]

    def grad_buffer(self, stream, logits):
        return logits

    def backward(self, parts, scale):
        """One GEMM per gradient for the parts of a chunk: an image-stream part that is the head of the
        image buffer and a text-stream part that fits the buffer's spare rows are stacked there
        ([g_s; g_sp] against [h_s; h_sp]: the fp32 weight gradient is read and written once per chunk,
        not twice); otherwise one GEMM per part."""
        alpha = 1.0 / scale
        if len(parts) == 2 and self._stackable(parts):
            first, second = parts
            n0 = first.grad.shape[0]
            n1 = second.grad.shape[0] if second.select is None else second.select.numel()
            stacked = self._work["s"][: n0 + n1]
            if second.select is None:
                stacked[n0:].copy_(second.grad)
            else:
                torch.index_select(second.grad, 0, second.select, out=stacked[n0:])
            hidden = torch.cat([_take(self.hidden["s"], first.rows), _take(self.hidden["sp"], second.rows)])
            self._accumulate(stacked, hidden, [(first, 0, n0), (second, n0, n0 + n1)], alpha)
            return
        for part in parts:
            g = part.gradient()
            self._accumulate(g, _take(self.hidden[part.stream], part.rows), [(part, 0, g.shape[0])], alpha)

    @staticmethod
    def spare_rows(n: int) -> int:
        return (n + 1) // 2

    def _stackable(self, parts) -> bool:
        first, second = parts
        buf = self._work.get("s")
        n1 = second.grad.shape[0] if second.select is None else second.select.numel()
        return (self.combine and first.stream == "s" and second.stream == "sp" and buf is not None
                and first.grad is self._current.get("s") and first.grad.shape[0] + n1 <= buf.shape[0])

    def _accumulate(self, grad, hidden, spans, alpha) -> None:
        """Hidden-state, weight and bias gradients of the logit gradients ``grad`` [n, width] whose rows
        ``spans`` [(part, begin, end)] belong to the parts' streams and rows; ``hidden`` [n, H]."""
        w = self.weight["s"]  # both student streams share the student lm_head
        wanted = [(p, a, b) for p, a, b in spans if self.need_hidden[p.stream]]
        if wanted:
            lo, hi = min(a for _, a, _ in wanted), max(b for _, _, b in wanted)
            gh_all = mm_fp32(grad[lo:hi], w)
            for part, a, b in wanted:
                if part.stream not in self.grad_hidden:
                    h = self.hidden[part.stream]
                    self.grad_hidden[part.stream] = torch.zeros(h.shape, device=h.device)
                gh = self.grad_hidden[part.stream]
                if isinstance(part.rows, slice):
                    gh[part.rows].add_(gh_all[a - lo:b - lo], alpha=alpha)
                else:
                    gh.index_add_(0, part.rows, gh_all[a - lo:b - lo], alpha=alpha)
        if self._grad_weight is not None:
            accumulate_mm(self._grad_weight[: self.width], grad.t(), hidden, alpha, beta=float(self._weight_written))
            self._weight_written = True
        if self.grad_bias is not None:
            self.grad_bias[: self.width].add_(grad.sum(0, dtype=torch.float32), alpha=alpha)

    @property
    def grad_weight(self) -> torch.Tensor | None:
        """The fp32 [V, H] weight gradient (rows [width, V), and everything when no GEMM ran, zero)."""
        if self._grad_weight is not None:
            if not self._weight_written:
                self._grad_weight.zero_()
                self._weight_written = True
            elif self.width < self._grad_weight.shape[0]:
                self._grad_weight[self.width:].zero_()
        return self._grad_weight

    def release(self):
        self._work.clear()
        self._current = {}


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as an fp32 tensor, for a small product ([chunk, H]: the hidden-state gradient).

    On CUDA with a bf16/fp16 ``b``, ``a`` is rounded to ``b``'s dtype (a no-op for the driver's
    gradients, already in that dtype) and the product is accumulated and returned in fp32, never
    rounded to bf16/fp16 (``torch.mm(..., out_dtype=torch.float32)``; on a torch without that
    overload the rounded operands are upcast and multiplied in fp32). On the CPU, operands of one
    bf16/fp16 dtype are multiplied in that dtype and the product upcast (upcasting ``b``, a weight,
    would copy it); other operands are upcast to fp32 and multiplied in fp32.
    """
    low = (torch.bfloat16, torch.float16)
    if on_gpu(a) and b.dtype in low:
        return _mm_low_precision_fp32_out(a.to(b.dtype), b)
    if a.dtype == b.dtype and a.dtype in low:
        return (a @ b).float()
    return a.float() @ b.float()


def accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> None:
    """``out = beta * out + alpha * (a @ b)`` in place (``beta`` 1: accumulate; 0: write, ``out`` not read,
    whatever it holds), for the fp32 (fp64) weight gradient ``out`` [V, H] and the chunk's operands ``a``
    [V, chunk] (the logit gradient, transposed) and ``b`` [chunk, H].

    No [V, H]-sized temporary: operands of ``out``'s dtype go to ``addmm_``; bf16/fp16 operands on
    CUDA to ``torch.addmm(out, a, b, out_dtype=torch.float32, out=out)`` (tensor cores, fp32
    accumulation; on a torch whose addmm refuses an fp32 ``out`` with bf16/fp16 operands -- before
    2.10 -- or with ``ADDMM_FP32_OUT = False``, in slabs of ``ACCUMULATE_SLAB_ROWS`` rows through
    ``torch.mm(out_dtype=torch.float32)``); on the CPU both (chunk-sized) operands are upcast to fp32 for
    ``addmm_`` (or slabs with ``ADDMM_FP32_OUT = False``). Reports the path taken to ``vgs_kernels.hooks``.
    """
    low = (torch.bfloat16, torch.float16)
    if a.dtype == out.dtype and b.dtype == out.dtype:
        path = "addmm"
        out.addmm_(a, b, alpha=alpha, beta=beta)
    elif a.dtype == b.dtype and a.dtype in low and (on_gpu(out) or ADDMM_FP32_OUT is False):
        path = _addmm_low_precision_fp32_out(out, a, b, alpha, beta)
    else:
        path = "upcast"
        out.addmm_(a.to(out.dtype), b.to(out.dtype), alpha=alpha, beta=beta)
    if hooks.active():
        hooks.emit("accumulate", path=path, shape=tuple(out.shape), k=a.shape[1], dtype=str(a.dtype), beta=beta)


# Rows of ``out`` per slab in accumulate_mm's fallback (an fp32 [slab, H] temporary: 64 MiB at H = 2048).
ACCUMULATE_SLAB_ROWS = 8192
# Whether torch.addmm(out_fp32, a_bf16, b_bf16, out_dtype=torch.float32, out=out_fp32) is used (torch >= 2.10
# on CUDA): None until the first call tries it, then True or False; set False to force the slab fallback
# (also on the CPU, with bf16 / fp16 operands: how the checks exercise it without a GPU).
ADDMM_FP32_OUT: bool | None = None


def _addmm_low_precision_fp32_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
                                  beta: float = 1.0) -> str:
    """The bf16 / fp16 accumulation of ``accumulate_mm``; returns the path taken."""
    global ADDMM_FP32_OUT
    if ADDMM_FP32_OUT is not False:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, alpha=alpha, beta=beta, out=out)
        except (TypeError, RuntimeError) as exc:
            # once the overload has worked, or when out of memory, a failure is a real error
            if ADDMM_FP32_OUT or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            ADDMM_FP32_OUT = False
        else:
            ADDMM_FP32_OUT = True
            return "addmm_fp32_out"
    for r0 in range(0, out.shape[0], ACCUMULATE_SLAB_ROWS):
        r1 = min(r0 + ACCUMULATE_SLAB_ROWS, out.shape[0])
        if beta == 0:
            torch.mul(_mm_low_precision_fp32_out(a[r0:r1], b), alpha, out=out[r0:r1])
        else:
            out[r0:r1].add_(_mm_low_precision_fp32_out(a[r0:r1], b), alpha=alpha)
    return "slabs"


# Whether torch.mm(..., out_dtype=) works here (torch >= 2.8): None until the first call.
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


# Chunk budgets: the bytes a chunk's logit buffers (and the row kernel's own temporaries) may take.
# CUDA: a quarter of the free memory, at most CUDA_CHUNK_BUDGET (2048 rows at V = 151936 in bf16
# with four streams; see benchmarks/gpu_model.py for the peak against Liger's); CPU: a fixed size
# (larger chunks buy nothing there).
CUDA_CHUNK_BUDGET = 5 * 2**29  # 2.5 GiB
CPU_CHUNK_BUDGET = 192 * 2**20
CHUNK_ROW_MULTIPLE = 128  # GEMM-friendly row counts once chunks are at least 2x this


def on_gpu(x: torch.Tensor | torch.device) -> bool:
    """Whether a tensor (or device) is on a CUDA device: tensor-core GEMMs with fp32 outputs, a
    chunk budget from free memory (always True inside ``hooks.simulate_gpu``)."""
    if hooks.simulated_free_bytes() is not None:
        return True
    return (x.type if isinstance(x, torch.device) else x.device.type) == "cuda"


def free_device_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device (``hooks.simulate_gpu``'s inside it)."""
    simulated = hooks.simulated_free_bytes()
    if simulated is not None:
        return simulated
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, temps: int = 0, *,
                       dtype: torch.dtype = torch.float32, streams: float = 4, largest: float = 1.0) -> int:
    """Rows per chunk for ``n_rows`` rows of ``vocab`` logits.

    A chunk row costs ``streams`` logit (or gradient) rows in ``dtype`` plus ``temps`` fp32 rows
    the row kernel allocates itself (the torch kernel's temporaries; 0 for the streaming kernels);
    as many rows as fit the budget (a quarter of free memory up to ``CUDA_CHUNK_BUDGET`` on CUDA,
    rounded down to a multiple of ``CHUNK_ROW_MULTIPLE``; ``CPU_CHUNK_BUDGET`` on CPU), and so few
    that the largest buffer (``largest`` logit rows per chunk row) holds at most half the rows: the
    fused path never holds the logits of the whole batch."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = max(1, math.ceil(vocab * (streams * itemsize + 4 * temps)))
    if on_gpu(device):
        budget = min(free_device_memory(device) // 4, CUDA_CHUNK_BUDGET)
    else:
        budget = CPU_CHUNK_BUDGET
    rows = max(1, budget // row_bytes)
    if on_gpu(device) and rows >= 2 * CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, math.floor(math.ceil(n_rows / 2) / largest)))

