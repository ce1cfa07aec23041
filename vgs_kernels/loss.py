"""The public loss functions: ``vgs_loss`` on logit rows and ``fused_linear_vgs_loss`` on hidden
states, each with one ``backend`` switch (SPEC.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import validation as V
from .backends import resolve
from .driver import DriverResult, LinearSource, LogitsSource, default_chunk_size, reduction_weights, run_vgs
from .options import VGSOptions
from .reference import reference_vgs

STAT_NAMES = ("std", "vis", "lang", "vds")


@dataclass
class VGSOutput:
    """What the VGS loss functions return.

    loss: scalar tensor (fp32), differentiable w.r.t. the student inputs.
    metrics: detached floats: std, vis, lang, vds (means over valid tokens), gate_fraction,
        threshold (the gate's theta; NaN when it came from a quantile over no tokens).
    per_token: with ``return_per_token=True``, detached fp32 tensors shaped like the mask
        ([B, T], or [N] for [N, V] inputs): std, vis, lang, vds, gate (0 on masked tokens).
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    per_token: dict[str, torch.Tensor] | None = field(default=None)


def vgs_loss(
    student_logits: torch.Tensor,
    student_text_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_text_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    mode: str = "vgs",
    alpha: float = 2.0,
    beta: float = 0.01,
    gamma: float = 1.0,
    quantile: float = 0.7,
    adaptive_quantiles: tuple[float, float] = (0.4, 0.7),
    threshold: float | tuple[float, float] | None = None,
    vds_scope: str = "global",
    temperature: float = 1.0,
    reduction: str = "sequence",
    vocab_size: int | None = None,
    detach_target_prior: bool = True,
    return_per_token: bool = False,
    backend: str = "auto",
) -> VGSOutput:
    """VGS loss on logit rows.

    Args:
        student_logits, student_text_logits: [B, T, V] or [N, V], the student with and without
            the image; they receive gradients (returned in their dtype).
        teacher_logits, teacher_text_logits: [B, T, V'] or [N, V'], no gradient.
        mask: [B, T] (or [N]) bool, True = response token that counts; None = all count.
        The remaining keywords are described in README.md and SPEC.md section 2.
    """
    opts = VGSOptions(
        mode=mode, alpha=alpha, beta=beta, gamma=gamma, quantile=quantile,
        adaptive_quantiles=adaptive_quantiles, threshold=threshold, vds_scope=vds_scope,
        temperature=temperature, reduction=reduction, vocab_size=vocab_size,
        detach_target_prior=detach_target_prior, return_per_token=return_per_token,
    )
    logits = (student_logits, student_text_logits, teacher_logits, teacher_text_logits)
    lead = V.check_pairs(V.LOGIT_NAMES, logits, (2, 3))
    vocab = V.check_vocab(vocab_size, student_logits.shape[-1], teacher_logits.shape[-1], "logits")
    mask2d = V.check_mask(mask, lead, student_logits.device)
    be = resolve(backend, student_logits.device)
    flat = [z.reshape(-1, z.shape[-1]) for z in logits]
    valid_idx = mask2d.reshape(-1).nonzero().squeeze(1)
    weights = reduction_weights(mask2d, opts.reduction)
    opts = _with_vocab(opts, vocab)

    if be is None:
        result = reference_vgs(*flat, valid_idx, weights, opts)
    else:
        need_grad = torch.is_grad_enabled() and (
            student_logits.requires_grad or student_text_logits.requires_grad
        )
        holder: dict = {}
        loss = _LogitsFunction.apply(
            student_logits, student_text_logits, teacher_logits, teacher_text_logits,
            valid_idx, weights, opts, be, need_grad, holder,
        )
        result = holder["result"]
        result.loss = loss
    _check_finite(result, lambda: {n: z.index_select(0, valid_idx) for n, z in zip(V.LOGIT_NAMES, flat)})
    return _output(result, valid_idx, lead, opts)


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
    mode: str = "vgs",
    alpha: float = 2.0,
    beta: float = 0.01,
    gamma: float = 1.0,
    quantile: float = 0.7,
    adaptive_quantiles: tuple[float, float] = (0.4, 0.7),
    threshold: float | tuple[float, float] | None = None,
    vds_scope: str = "global",
    temperature: float = 1.0,
    reduction: str = "sequence",
    vocab_size: int | None = None,
    detach_target_prior: bool = True,
    return_per_token: bool = False,
    backend: str = "auto",
) -> VGSOutput:
    """VGS loss from hidden states and lm_head weights, never materialising all [B*T, V] logits.

    Args:
        student_hidden, student_text_hidden: [B, T, H_s] or [N, H_s]; receive gradients.
        student_weight: [V, H_s] lm_head weight (receives a gradient, accumulated in fp32);
            student_bias: optional [V].
        teacher_hidden, teacher_text_hidden: [B, T, H_t] or [N, H_t]; teacher_weight [V', H_t],
            teacher_bias optional [V']; no gradient.
        chunk_size: token rows per chunk (default: chosen from B*T, H, V and free memory).
        Other keywords as in :func:`vgs_loss`.

    When a hidden state's dtype differs from its weight's (mixed precision), the GEMMs run in
    the hidden state's dtype; gradients are returned in each input's own dtype.
    """
    opts = VGSOptions(
        mode=mode, alpha=alpha, beta=beta, gamma=gamma, quantile=quantile,
        adaptive_quantiles=adaptive_quantiles, threshold=threshold, vds_scope=vds_scope,
        temperature=temperature, reduction=reduction, vocab_size=vocab_size,
        detach_target_prior=detach_target_prior, return_per_token=return_per_token,
    )
    hidden = (student_hidden, student_text_hidden, teacher_hidden, teacher_text_hidden)
    lead = V.check_pairs(V.HIDDEN_NAMES, hidden, (2, 3))
    V.check_same_dtype(V.HIDDEN_NAMES[:2], hidden[:2])
    V.check_same_dtype(V.HIDDEN_NAMES[2:], hidden[2:])
    ws = V.check_weight("student_weight", student_weight, "student_hidden", student_hidden)
    wt = V.check_weight("teacher_weight", teacher_weight, "teacher_hidden", teacher_hidden)
    bs = V.check_bias("student_bias", student_bias, ws)
    bt = V.check_bias("teacher_bias", teacher_bias, wt)
    vocab = V.check_vocab(vocab_size, ws.shape[0], wt.shape[0], "lm_head weights")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    mask2d = V.check_mask(mask, lead, student_hidden.device)
    be = resolve(backend, student_hidden.device)
    flat = [h.reshape(-1, h.shape[-1]) for h in hidden]
    valid_idx = mask2d.reshape(-1).nonzero().squeeze(1)
    weights = reduction_weights(mask2d, opts.reduction)
    opts = _with_vocab(opts, vocab)

    if be is None:
        logits = [
            torch.nn.functional.linear(h, w.to(h.dtype), None if b is None else b.to(h.dtype))
            for h, w, b in zip(flat, (ws, ws, wt, wt), (bs, bs, bt, bt))
        ]
        result = reference_vgs(logits[0], logits[1], logits[2].detach(), logits[3].detach(), valid_idx, weights, opts)
    else:
        need_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (student_hidden, student_text_hidden, ws, bs)
        )
        chunk = chunk_size or default_chunk_size(valid_idx.numel(), vocab, student_hidden.device, be.chunk_temps)
        holder: dict = {}
        loss = _LinearFunction.apply(
            student_hidden, student_text_hidden, ws, bs, teacher_hidden, teacher_text_hidden, wt, bt,
            valid_idx, weights, opts, be.rows_fn, need_grad, chunk, holder,
        )
        result = holder["result"]
        result.loss = loss
    _check_finite(result, lambda: {
        **{n: h.index_select(0, valid_idx) for n, h in zip(V.HIDDEN_NAMES, flat)},
        "student_weight": ws, "teacher_weight": wt,
        **({"student_bias": bs} if bs is not None else {}),
        **({"teacher_bias": bt} if bt is not None else {}),
    })
    return _output(result, valid_idx, lead, opts)


class _LogitsFunction(torch.autograd.Function):
    """Loss and logit gradients in one forward (the gradients are analytic, no graph over V)."""

    @staticmethod
    def forward(ctx, zs, zsp, zt, ztp, valid_idx, weights, opts, backend, need_grad, holder):
        flat = [z.reshape(-1, z.shape[-1]) for z in (zs, zsp, zt, ztp)]
        source = LogitsSource(*flat, vocab=opts.vocab_size)
        chunk = default_chunk_size(valid_idx.numel(), opts.vocab_size, zs.device, backend.chunk_temps)
        holder["result"] = result = run_vgs(
            source, valid_idx, weights, opts, backend.rows_fn, chunk, need_grad, _compute_dtype(zs)
        )
        grads = [source.grads.get(k) for k in ("s", "sp")]
        if need_grad:  # a stream with no gradient (e.g. all-False mask) gets zeros, like autograd
            grads = [torch.zeros_like(z) if g is None else g.view(z.shape) for g, z in zip(grads, (zs, zsp))]
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        out = [(g := next(saved)) * grad_loss.to(g.dtype) if has else None for has in ctx.has]
        return (*out, None, None, None, None, None, None, None, None)


class _LinearFunction(torch.autograd.Function):
    """Loss and hidden/weight/bias gradients in one forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hs, hsp, ws, bs, ht, htp, wt, bt, valid_idx, weights, opts, rows_fn, need_grad, chunk, holder):
        flat = [h.reshape(-1, h.shape[-1]) for h in (hs, hsp, ht, htp)]
        # The GEMMs run in the hidden states' dtype (weights cast once if they differ).
        ws_c = ws.to(hs.dtype)
        wt_c = wt.to(ht.dtype)
        bs_c = None if bs is None else bs.to(hs.dtype)
        bt_c = None if bt is None else bt.to(ht.dtype)
        source = LinearSource(
            flat[0], flat[1], ws_c, bs_c, flat[2], flat[3], wt_c, bt_c, opts.vocab_size, need_grad
        )
        with torch.autocast(device_type=hs.device.type, enabled=False):
            holder["result"] = result = run_vgs(
                source, valid_idx, weights, opts, rows_fn, chunk, need_grad, _compute_dtype(hs)
            )
        if need_grad:
            gh = source.grad_hidden
            grads = [
                gh["s"].to(hs.dtype).view(hs.shape) if "s" in gh else torch.zeros_like(hs),
                gh["sp"].to(hsp.dtype).view(hsp.shape) if "sp" in gh else torch.zeros_like(hsp),
                source.grad_weight.to(ws.dtype),
                None if bs is None else source.grad_bias.to(bs.dtype),
            ]
        else:
            grads = [None] * 4
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return result.loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        out = [(g := next(saved)) * grad_loss.to(g.dtype) if has else None for has in ctx.has]
        return (*out, None, None, None, None, None, None, None, None, None, None, None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _with_vocab(opts: VGSOptions, vocab: int) -> VGSOptions:
    return replace(opts, vocab_size=vocab)


def _check_finite(result: DriverResult, rows_by_name) -> None:
    if not bool(torch.isfinite(result.stats).all()):
        V.raise_non_finite(rows_by_name())


def _output(result: DriverResult, valid_idx: torch.Tensor, lead: tuple[int, ...], opts: VGSOptions) -> VGSOutput:
    n_valid = valid_idx.numel()
    summary = torch.cat([result.stats.sum(0), result.gate.sum().reshape(1)]).tolist()
    denom = max(n_valid, 1)
    metrics = {name: summary[i] / denom for i, name in enumerate(STAT_NAMES)}
    metrics["gate_fraction"] = summary[4] / denom
    metrics["threshold"] = float(result.theta)
    per_token = None
    if opts.return_per_token:
        n = 1
        for d in lead:
            n *= d
        per_token = {}
        columns = {**{k: result.stats[:, i] for i, k in enumerate(STAT_NAMES)}, "gate": result.gate}
        for k, col in columns.items():
            full = torch.zeros(n, device=valid_idx.device)
            full[valid_idx] = col.detach().float()
            per_token[k] = full.view(lead)
    return VGSOutput(loss=result.loss, metrics=metrics, per_token=per_token)
