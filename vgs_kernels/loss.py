"""The public loss functions: ``vgs_loss`` on logit rows and ``fused_linear_vgs_loss`` on hidden
states, each with one ``backend`` switch. What they compute: docs/math.md; how: docs/kernels.md."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Unpack

import torch

from . import modes
from . import validation as V
from .backends import Backend, resolve
from .driver import DriverResult, reduction_weights, run_vgs
from .options import CallKeywords, VGSOptions, split_keywords, takes_loss_keywords
from .reference import reference_vgs
from .sources import LinearSource, LogitsSource

STAT_NAMES = ("std", "vis", "lang", "vds")
TEXT_METRICS = ("vis", "lang", "vds", "gate_fraction", "threshold")


@dataclass
class VGSOutput:
    """What the VGS loss functions return.

    loss: scalar tensor, fp32 (fp64 for fp64 inputs with ``backend="reference"``; the row
        backends compute each row's KLs in fp64 for fp64 inputs, then sum them in fp32),
        differentiable w.r.t. the student inputs. With ``reduction="none"`` (``vgs_loss`` only):
        the per-token losses shaped like the mask (0 on masked tokens), differentiable; backward
        takes any upstream per-token gradient.
    metrics: detached floats: std, vis, lang, vds (means over valid tokens), gate_fraction,
        threshold (the gate's theta; NaN when it came from a quantile over no tokens or when
        ``gate=`` was given). Without the text-only streams (``mode="standard"`` with None for
        them) all but std are NaN. With ``sync_metrics=False`` all but threshold are 0-d fp32
        tensors on the inputs' device (never read to the host).
    per_token: with ``return_per_token=True``, detached fp32 tensors shaped like the mask
        ([B, T], or [N] for [N, V] inputs): std, vis, lang, vds, gate, and objective (gamma times the
        mode's per-token objective, what the reduction weights multiply), 0 on masked tokens.
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    per_token: dict[str, torch.Tensor] | None = field(default=None)


@takes_loss_keywords
def vgs_loss(
    student_logits: torch.Tensor,
    student_text_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_text_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str | Backend = "auto",
    **keywords: Unpack[CallKeywords],
) -> VGSOutput:
    """VGS loss on logit rows.

    Args:
        student_logits, student_text_logits: [B, T, V] or [N, V], the student with and without
            the image; they receive gradients (returned in their dtype).
        teacher_logits, teacher_text_logits: [B, T, V'] or [N, V'], no gradient. With
            ``mode="standard"`` both text-only logits may be None (the loss does not read them).
        mask: [B, T] (or [N]) bool, True = response token that counts; None = all count (or,
            given ``weights``, the tokens with a non-zero weight).
        weights: float tensor shaped like the mask: per-token multipliers of the objective
            before the reduction (no gradient flows into them).
        cu_seqlens: [S + 1] int, 0 = cu[0] <= ... <= cu[S] = N, with [N, V] inputs of packed
            sequences: sequence s is rows cu[s]:cu[s + 1] (for ``reduction="sequence"``; without
            it [N, V] rows are one sequence).
        gate: bool tensor shaped like the mask, the gate of the gated term instead of
            ``VDS > theta`` (not in ``mode="adaptive"``, not with ``threshold``); nothing is
            gathered across ranks then. :func:`vgs_kernels.vds_threshold` computes one per batch.
        reduction: ``"sequence"`` (mean per sequence, then over sequences with a valid token),
            ``"token"`` (mean over valid tokens), ``"sum"`` (gamma * sum of weight * objective:
            normalise it yourself), ``"none"`` (per-token losses shaped like the mask).
        vds_scope, process_group: ``"global"`` (default) takes the VDS quantile over every rank
            of ``process_group`` (None: the default group) when torch.distributed is
            initialised: two all_gathers inside this call, so every rank of the group must make
            the same sequence of calls (collectives pair up by order: an extra call on one rank
            mixes batches, then hangs). With dynamic batching (ranks making different numbers of
            calls) use ``"local"``, or ``threshold=`` / ``gate=`` from
            :func:`vgs_kernels.vds_threshold` computed once per batch. No collective runs when
            ``threshold`` or ``gate`` is given.
        temperature: softmax temperature tau, a finite number >= 1e-6 (smaller values would
            overflow the finite fp32 stand-in for -inf logits once divided by tau).
        sync_metrics: False keeps ``out.metrics`` as device tensors (no ``.item()`` host sync for
            them; the driver still synchronises to select rows, to take the quantile (also per
            chunk, for the predicted gate of ``mode="vgs"``, unless ``threshold`` or ``gate`` is
            given) and, for fp16 inputs, to pick each chunk's gradient scale).

    -inf logits are allowed where a stream's counterpart has them too. A teacher row with -inf
    (probability 0) where the student has probability > 0 makes the reverse KL infinite: a
    ValueError naming the stream (e.g. a top-k teacher: the full teacher logits are needed).

    Only inputs with ``requires_grad`` get a gradient computed (a frozen stream costs no
    gradient buffer).
    """
    (weights, cu_seqlens, gate), opts = split_keywords(keywords, "vgs_loss")
    text = V.check_text_streams(opts.mode, (V.LOGIT_NAMES[1], V.LOGIT_NAMES[3]), student_text_logits, teacher_text_logits)
    if not text:  # standard mode without the text view: the image streams stand in (never differentiated)
        student_text_logits, teacher_text_logits = student_logits, teacher_logits
    logits = (student_logits, student_text_logits, teacher_logits, teacher_text_logits)
    lead = V.check_pairs(V.LOGIT_NAMES, logits, (2, 3))
    V.check_nonempty(V.LOGIT_NAMES, logits, "vocabulary (V=0)")
    vocab = V.check_vocab(
        opts.vocab_size, (V.LOGIT_NAMES[0], student_logits.shape[-1]), (V.LOGIT_NAMES[2], teacher_logits.shape[-1])
    )
    rows = _Rows.build(lead, student_logits.device, mask, weights, cu_seqlens, gate, opts)
    be = resolve(backend, student_logits.device)
    flat = [z.reshape(-1, z.shape[-1]) for z in logits]
    valid_idx = rows.valid_idx
    V.check_sparse_logits(V.LOGIT_NAMES, flat, valid_idx, vocab, max(1, 2**26 // vocab))
    opts = _with_vocab(opts, vocab)
    per_token = opts.reduction == "none"

    if be is None:
        result = reference_vgs(*flat, valid_idx, rows.weights, opts, rows.gate)
        if per_token:
            result.loss = _scatter_rows(result.per_row, valid_idx, lead)
    else:
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and student_logits.requires_grad, grad_on and text and student_text_logits.requires_grad)
        holder: dict = {}
        loss = _LogitsFunction.apply(
            student_logits, student_text_logits, teacher_logits, teacher_text_logits,
            valid_idx, rows.weights, rows.gate, opts, be, needs, holder,
        )
        result = holder["result"]
        result.loss = loss
    _check_finite(result, lambda: {n: z.index_select(0, valid_idx) for n, z in zip(V.LOGIT_NAMES, flat)})
    return _output(result, valid_idx, lead, opts, text)


@takes_loss_keywords
def fused_linear_vgs_loss(
    student_hidden: torch.Tensor,
    student_text_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_text_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | Backend = "auto",
    **keywords: Unpack[CallKeywords],
) -> VGSOutput:
    """VGS loss from hidden states and lm_head weights, never materialising all [B*T, V] logits.

    Args:
        student_hidden, student_text_hidden: [B, T, H_s] or [N, H_s]; receive gradients. With
            ``mode="standard"`` both text-only hidden states may be None: their two lm_head GEMMs
            are skipped (the loss does not read them; the text metrics are NaN).
        student_weight: [V, H_s] lm_head weight (receives a gradient, accumulated in fp32);
            student_bias: optional [V], on the weight's device.
        teacher_hidden, teacher_text_hidden: [B, T, H_t] or [N, H_t]; teacher_weight [V', H_t],
            teacher_bias optional [V']; no gradient.
        chunk_size: token rows per chunk (default: chosen from B*T, H, V and free memory).
        cu_seqlens: with [N, H] hidden states of packed sequences, as in :func:`vgs_loss`.
        reduction: ``"sequence"``, ``"token"`` or ``"sum"``; ``"none"`` is refused (per-token
            losses would need each row's logit gradients kept until backward, i.e. the [N, V]
            logits this function exists to avoid): pass your per-token multipliers as
            ``weights=`` with ``reduction="sum"``.
        Other keywords (weights, gate, process_group, sync_metrics, ...) as in :func:`vgs_loss`.

    Only what requires a gradient gets one computed: a frozen ``student_weight`` (or bias) costs
    no [V, H] gradient buffer and no weight-gradient GEMM, frozen hidden states no [N, H] buffer
    and no hidden-gradient GEMM.

    When a hidden state's dtype differs from its weight's (mixed precision), the GEMMs run in
    the hidden state's dtype; gradients are returned in each input's own dtype.
    """
    (weights, cu_seqlens, gate), opts = split_keywords(keywords, "fused_linear_vgs_loss")
    text = V.check_text_streams(opts.mode, (V.HIDDEN_NAMES[1], V.HIDDEN_NAMES[3]), student_text_hidden, teacher_text_hidden)
    if not text:  # standard mode without the text view: the image streams stand in, computed once
        student_text_hidden, teacher_text_hidden = student_hidden, teacher_hidden
    hidden = (student_hidden, student_text_hidden, teacher_hidden, teacher_text_hidden)
    lead = V.check_pairs(V.HIDDEN_NAMES, hidden, (2, 3))
    V.check_nonempty(V.HIDDEN_NAMES, hidden, "hidden size (H=0)")
    V.check_same_dtype(V.HIDDEN_NAMES[:2], hidden[:2])
    V.check_same_dtype(V.HIDDEN_NAMES[2:], hidden[2:])
    ws = V.check_weight("student_weight", student_weight, "student_hidden", student_hidden)
    wt = V.check_weight("teacher_weight", teacher_weight, "teacher_hidden", teacher_hidden)
    bs = V.check_bias("student_bias", student_bias, "student_weight", ws)
    bt = V.check_bias("teacher_bias", teacher_bias, "teacher_weight", wt)
    vocab = V.check_vocab(opts.vocab_size, ("student_weight", ws.shape[0]), ("teacher_weight", wt.shape[0]))
    V.check_chunk_size(chunk_size)
    if opts.reduction == "none":
        raise ValueError(
            "reduction='none' is not supported by fused_linear_vgs_loss (per-token losses would need every "
            "row's logit gradients kept until backward, i.e. the [N, V] logits it avoids): pass your "
            "per-token multipliers as weights= with reduction='sum', or use vgs_loss on logits"
        )
    rows = _Rows.build(lead, student_hidden.device, mask, weights, cu_seqlens, gate, opts)
    be = resolve(backend, student_hidden.device)
    flat = [h.reshape(-1, h.shape[-1]) for h in hidden]
    valid_idx = rows.valid_idx
    V.check_sparse_bias(bt, bs, vocab)
    opts = _with_vocab(opts, vocab)

    if be is None:
        logits = [
            torch.nn.functional.linear(h, w.to(h.dtype), None if b is None else b.to(h.dtype))
            for h, w, b in zip(flat, (ws, ws, wt, wt), (bs, bs, bt, bt))
        ]
        result = reference_vgs(
            logits[0], logits[1], logits[2].detach(), logits[3].detach(), valid_idx, rows.weights, opts, rows.gate
        )
    else:
        grad_on = torch.is_grad_enabled()
        # (hidden, text hidden, weight, bias): each gets a gradient only when it requires one
        needs = tuple(
            grad_on and t is not None and t.requires_grad
            for t in (student_hidden, student_text_hidden if text else None, ws, bs)
        )
        holder: dict = {}
        loss = _LinearFunction.apply(
            student_hidden, student_text_hidden, ws, bs, teacher_hidden, teacher_text_hidden, wt, bt,
            valid_idx, rows.weights, rows.gate, opts, be, needs, chunk_size, not text, holder,
        )
        result = holder["result"]
        result.loss = loss
    _check_finite(result, lambda: {
        **{n: h.index_select(0, valid_idx) for n, h in zip(V.HIDDEN_NAMES, flat)},
        "student_weight": ws, "teacher_weight": wt,
        **({"student_bias": bs} if bs is not None else {}),
        **({"teacher_bias": bt} if bt is not None else {}),
    })
    return _output(result, valid_idx, lead, opts, text)


def _scaled(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """``grad * upstream``; ``grad`` itself when the upstream gradient is the scalar 1 (the loss is the final
    one: one host sync saves a pass over a weight-sized gradient)."""
    if upstream.numel() == 1 and bool(upstream == 1):
        return grad
    return grad * upstream.to(grad.dtype)


class _LogitsFunction(torch.autograd.Function):
    """Loss and logit gradients in one forward (the gradients are analytic, no graph over V)."""

    @staticmethod
    def forward(ctx, zs, zsp, zt, ztp, valid_idx, weights, gate, opts, backend, needs, holder):
        flat = [z.reshape(-1, z.shape[-1]) for z in (zs, zsp, zt, ztp)]
        source = LogitsSource(*flat, vocab=opts.vocab_size, needs=needs)
        chunk = source.chunk_rows(valid_idx.numel(), backend.chunk_temps)
        holder["result"] = result = run_vgs(
            source, valid_idx, weights, opts, backend.rows_fn, chunk, any(needs), gate=gate
        )
        # a stream that needs a gradient but got none (e.g. all-False mask) gets zeros, like autograd
        grads = [
            (torch.zeros_like(z) if k not in source.grads else source.grads[k].view(z.shape)) if need else None
            for k, z, need in zip(("s", "sp"), (zs, zsp), needs)
        ]
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        # reduction="none": the gradients above are each row's own (every row's objective depends
        # on its own logits only; pass 1, the predicted gate's corrections and any fp16 scale are
        # already summed and undone in them), so backward scales row t by the upstream gradient of token t
        ctx.per_token = opts.reduction == "none"
        if ctx.per_token:
            return _scatter_rows(result.per_row, valid_idx, zs.shape[:-1])
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        upstream = grad_loss.unsqueeze(-1) if ctx.per_token else grad_loss
        out = [_scaled(next(saved), upstream) if has else None for has in ctx.has]
        return (*out, None, None, None, None, None, None, None, None, None)


class _LinearFunction(torch.autograd.Function):
    """Loss and hidden/weight/bias gradients in one forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hs, hsp, ws, bs, ht, htp, wt, bt, valid_idx, weights, gate, opts, backend, needs, chunk_size,
                alias_text, holder):
        flat = [h.reshape(-1, h.shape[-1]) for h in (hs, hsp, ht, htp)]
        # The GEMMs run in the hidden states' dtype (weights cast once if they differ).
        ws_c = ws.to(hs.dtype)
        wt_c = wt.to(ht.dtype)
        bs_c = None if bs is None else bs.to(hs.dtype)
        bt_c = None if bt is None else bt.to(ht.dtype)
        source = LinearSource(
            flat[0], flat[1], ws_c, bs_c, flat[2], flat[3], wt_c, bt_c, opts.vocab_size, needs, alias_text
        )
        chunk = chunk_size or source.chunk_rows(valid_idx.numel(), backend.chunk_temps)
        with torch.autocast(device_type=hs.device.type, enabled=False):
            holder["result"] = result = run_vgs(
                source, valid_idx, weights, opts, backend.rows_fn, chunk, any(needs), gate=gate
            )
        gh = source.grad_hidden
        # a hidden stream that needs a gradient but got none (e.g. all-False mask) gets zeros
        grads = [
            (gh[k].to(h.dtype).view(h.shape) if k in gh else torch.zeros_like(h)) if need else None
            for k, h, need in zip(("s", "sp"), (hs, hsp), needs[:2])
        ]
        grads.append(source.grad_weight.to(ws.dtype) if needs[2] else None)
        grads.append(source.grad_bias.to(bs.dtype) if needs[3] else None)
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        out = [_scaled(next(saved), grad_loss) if has else None for has in ctx.has]
        return (*out, None, None, None, None, None, None, None, None, None, None, None, None, None)


@dataclass
class _Rows:
    """The token rows a call counts: valid row indices, their reduction weights and gate."""

    valid_idx: torch.Tensor  # [n_valid] long, row-major over the token dims
    weights: torch.Tensor  # [n_valid] fp32 reduction weights (before gamma)
    gate: torch.Tensor | None  # [n_valid] fp32 {0, 1}, the caller's gate

    @staticmethod
    def build(lead, device, mask, weights, cu_seqlens, gate, opts: VGSOptions) -> _Rows:
        w = V.check_token_weights(weights, lead, device)
        cu = V.check_cu_seqlens(cu_seqlens, lead, device)
        g = V.check_gate(gate, lead, device, opts.mode, opts.threshold)
        if mask is None and w is not None:  # a token with weight 0 counts as masked
            mask2d = w != 0
        else:
            mask2d = V.check_mask(mask, lead, device)
        valid_idx = mask2d.reshape(-1).nonzero().squeeze(1)
        red = reduction_weights(mask2d, opts.reduction, w, cu)
        g = None if g is None else g.reshape(-1).index_select(0, valid_idx).float()
        return _Rows(valid_idx, red, g)


def _scatter_rows(per_row: torch.Tensor, valid_idx: torch.Tensor, lead) -> torch.Tensor:
    """[n_valid] per-row values -> a tensor shaped like the token dims, 0 on the other rows."""
    n = 1
    for d in lead:
        n *= d
    full = torch.zeros(n, device=per_row.device, dtype=per_row.dtype)
    return full.index_copy(0, valid_idx, per_row).view(tuple(lead))


def _with_vocab(opts: VGSOptions, vocab: int) -> VGSOptions:
    return replace(opts, vocab_size=vocab)


def _check_finite(result: DriverResult, rows_by_name) -> None:
    if not bool(torch.isfinite(result.stats).all()):
        V.raise_non_finite(rows_by_name())


def _output(
    result: DriverResult, valid_idx: torch.Tensor, lead: tuple[int, ...], opts: VGSOptions, text: bool = True
) -> VGSOutput:
    n_valid = valid_idx.numel()
    sums = torch.cat([result.stats.sum(0), result.gate.sum().reshape(1)]).detach()
    denom = max(n_valid, 1)
    # sync_metrics=False: 0-d device tensors, never read to the host
    summary = [x / denom for x in sums.tolist()] if opts.sync_metrics else list(sums / denom)
    metrics = {name: summary[i] for i, name in enumerate(STAT_NAMES)}
    metrics["gate_fraction"] = summary[4]
    metrics["threshold"] = float(result.theta)
    if not text:
        nan = float("nan")
        metrics.update({k: nan if k == "threshold" or opts.sync_metrics else torch.full_like(summary[0], nan)
                        for k in TEXT_METRICS})
    per_token = None
    if opts.return_per_token:
        n = 1
        for d in lead:
            n *= d
        per_token = {}
        columns = {**{k: result.stats[:, i] for i, k in enumerate(STAT_NAMES)}, "gate": result.gate}
        # each token's gamma * objective (what its reduction weight multiplies)
        terms = {k: result.stats[:, i].double() for i, k in enumerate(STAT_NAMES)}
        columns["objective"] = opts.gamma * modes.objective(modes.get(opts.mode), terms, opts.alpha, opts.beta,
                                                            result.gate.double(), None if result.ramp is None
                                                            else result.ramp.double())
        for k, col in columns.items():
            full = torch.zeros(n, device=valid_idx.device)
            full[valid_idx] = col.detach().float()
            if not text and k not in ("std", "objective"):
                full.fill_(float("nan"))
            per_token[k] = full.view(lead)
    return VGSOutput(loss=result.loss, metrics=metrics, per_token=per_token)
