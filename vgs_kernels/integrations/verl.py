"""VGS as a verl distillation loss, aggregated by verl's own ``agg_loss``.

verl (0.9) computes a distillation loss per response token and aggregates it with
``verl.trainer.ppo.core_algos.agg_loss(loss_mat, loss_mask, loss_agg_mode, **global_batch_info)``
(``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-mean``,
``seq-mean-token-sum-norm``). The global-batch normalisers come with each micro-batch: verl's engine puts
``dp_size``, ``batch_num_tokens`` and ``global_batch_size`` into the micro-batch (``data``), and its
``distillation_loss()`` copies them, with the actor config's ``loss_scale_factor``, into
``config.global_batch_info`` right before it aggregates (that dict starts empty: reading it earlier gives
each rank's local mean). ``normalisers(config, data)`` reads them the same way.
Per-token VGS losses from hidden states cannot be returned without the [N, V] logits, but every
``agg_loss`` mode is linear in the per-token losses: ``agg_loss(L, M) = sum_t c_t * L_t``. This
adapter takes the ``c_t`` from verl's ``agg_loss`` itself (its gradient with respect to
``loss_mat``) and passes them to :func:`vgs_kernels.fused_linear_vgs_loss` as ``weights=`` with
``reduction="sum"``, so the loss and its gradients are exactly ``agg_loss`` of the per-token VGS
losses, computed chunk by chunk from the hidden states.

Two entry points:

* :func:`vgs_distillation_loss`: the aggregated loss of one micro-batch from packed response rows, for a
  verl-based trainer of your own;
* :func:`vgs_token_losses`, registered as verl's distillation loss ``"vgs"`` by :func:`register`: what
  verl's own ``distillation_loss()`` calls with ``distillation.distillation_loss.loss_mode: vgs``. It returns
  per-token losses (the mode's objective per token, detached) plus a term that carries the gradient, so
  that ``agg_loss`` of them has the VGS loss's value and gradient for every ``loss_agg_mode``, and the
  loss min / max metrics and ``use_policy_gradient`` (advantages = - per-token loss) work as for verl's
  own losses. Its inputs (the four views' hidden states and both lm_heads) come from the VGS engine
  (``vgs_train.integrations.verl``) as ``model_output["vgs"]``.

verl is imported when the loss is called (install verl 0.9.x beside this package); importing this module
does not need it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..loss import fused_linear_vgs_loss

# keywords the adapter sets itself
_RESERVED = ("mask", "weights", "reduction", "cu_seqlens")


def verl_agg_loss():
    """verl's ``agg_loss`` (imported on first use)."""
    try:
        from verl.trainer.ppo.core_algos import agg_loss
    except ImportError as exc:
        raise ImportError(
            "vgs_kernels.integrations.verl needs verl 0.9.x (its agg_loss defines the loss_agg_mode semantics): "
            "pip install 'verl>=0.9,<0.10' (or this package's 'verl' extra from a checkout)"
        ) from exc
    return agg_loss


def agg_coefficients(
    response_mask: torch.Tensor, loss_agg_mode: str, global_batch_info: dict[str, Any] | None = None
) -> torch.Tensor:
    """The per-token coefficients c [bsz, resp_len] (fp64) with ``agg_loss(L, mask, mode, **info)``
    = ``sum(c * L)`` for every loss matrix L, read off verl's ``agg_loss`` by autograd."""
    agg_loss = verl_agg_loss()
    loss_mat = torch.zeros(response_mask.shape, dtype=torch.float64, device=response_mask.device,
                           requires_grad=True)
    with torch.enable_grad():
        total = agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                         **(global_batch_info or {}))
        if not (isinstance(total, torch.Tensor) and total.requires_grad):  # no valid token
            return torch.zeros_like(loss_mat, requires_grad=False)
        (coef,) = torch.autograd.grad(total, loss_mat, allow_unused=True)
    return torch.zeros_like(loss_mat).detach() if coef is None else coef


def vgs_distillation_loss(
    student_hidden: torch.Tensor,
    student_text_hidden: torch.Tensor | None,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_text_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    cu_seqlens: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    global_batch_info: dict[str, Any] | None = None,
    metric_prefix: str = "distillation/vgs_",
    **vgs_keywords,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The VGS distillation loss of one verl micro-batch, aggregated as verl's ``agg_loss`` does.

    Args:
        student_hidden, student_text_hidden: [N, H_s] final hidden states of the response tokens
            (the rows that predict them), sequences packed without padding, the student with and
            without the image (gradients flow into them); the text-only view has the same
            response tokens after its image-free prompt.
        student_weight: [V, H_s] the student's lm_head weight (gradient accumulated in fp32).
        teacher_hidden, teacher_text_hidden: [N, H_t] the teacher's, same rows (no gradient).
        teacher_weight: [V', H_t] a local copy of the teacher's lm_head.
        cu_seqlens: [S + 1] int, sequence s's response is rows cu[s]:cu[s + 1].
        response_mask: verl's ``data["response_mask"]`` [S, resp_len] (padded; a nested tensor is
            padded here; entries past a sequence's length must be 0), or a packed [N] mask. With a
            packed mask, ``seq-mean-token-sum-norm`` needs ``loss_scale_factor`` in
            ``global_batch_info`` (verl otherwise divides by the padded width).
        loss_agg_mode: the actor's ``loss_agg_mode``.
        global_batch_info: the global-batch normalisers (``dp_size``, ``batch_num_tokens``,
            ``global_batch_size``, ``loss_scale_factor``), passed to ``agg_loss`` unchanged: read them from
            the micro-batch with :func:`normalisers` (verl's engine puts the first three there; the actor
            config's ``global_batch_info`` is filled from them only inside verl's own loss functions).
        metric_prefix: prefix of the returned metric names.
        vgs_keywords: the loss keywords of :func:`vgs_kernels.fused_linear_vgs_loss` (mode, alpha,
            beta, gamma, threshold / gate, vds_scope, process_group, temperature, vocab_size,
            student_bias, teacher_bias, chunk_size, backend, ...); not mask, weights, reduction
            or cu_seqlens, which the adapter sets. With ``vds_scope="global"`` (the default) pass
            ``process_group=`` the data-parallel group verl hands every loss function (``dp_group``): the
            VDS quantile is then taken over the group's ranks, one all-gather per call; verl 0.9's engine
            gives every rank the same number of micro-batches (``same_micro_num_in_dp``), so the calls pair up.

    Returns:
        (loss, metrics): the scalar loss verl backpropagates (``agg_loss`` of the per-token VGS
        objective), and the VGS metrics (std, vis, lang, vds, gate_fraction, threshold) under
        ``metric_prefix``.
    """
    clash = sorted(set(vgs_keywords) & set(_RESERVED))
    if clash:
        raise ValueError(f"vgs_distillation_loss sets {clash} itself (from cu_seqlens, response_mask and "
                         "loss_agg_mode); do not pass them")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D [S + 1] int tensor, got {cu_seqlens!r}")
    if student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must be packed rows [N, H], got shape {tuple(student_hidden.shape)}")
    device = student_hidden.device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    n_seq, n_rows = lengths.numel(), student_hidden.shape[0]
    if int(cu[0]) != 0 or int(cu[-1]) != n_rows or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at N={n_rows} (the packed rows), "
                         f"got {cu_seqlens.tolist()}")
    seq_id = torch.repeat_interleave(torch.arange(n_seq, device=device), lengths)
    pos = torch.arange(n_rows, device=device) - cu[seq_id]
    mask2d = _padded_mask(response_mask, lengths, seq_id, pos, global_batch_info, loss_agg_mode, device)
    coef = agg_coefficients(mask2d, loss_agg_mode, global_batch_info).masked_fill(~mask2d, 0.0)
    out = fused_linear_vgs_loss(
        student_hidden, student_text_hidden, student_weight, teacher_hidden, teacher_text_hidden, teacher_weight,
        mask2d[seq_id, pos], weights=coef[seq_id, pos].float(), reduction="sum", cu_seqlens=cu, **vgs_keywords,
    )
    return out.loss, {f"{metric_prefix}{k}": v for k, v in out.metrics.items()}


def _padded_mask(response_mask, lengths, seq_id, pos, info, mode, device) -> torch.Tensor:
    """response_mask (verl's padded [S, T], nested, or packed [N]) -> bool [S, T]."""
    if not isinstance(response_mask, torch.Tensor):
        raise ValueError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.is_nested:
        response_mask = response_mask.to_padded_tensor(0)
    m = response_mask.to(device)
    n_seq, n_rows = lengths.numel(), seq_id.numel()
    if m.dim() == 1:
        if m.shape[0] != n_rows:
            raise ValueError(f"a packed response_mask must have shape [{n_rows}] (the packed rows), "
                             f"got {tuple(m.shape)}")
        if mode == "seq-mean-token-sum-norm" and (info or {}).get("loss_scale_factor") is None:
            raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' with a packed response_mask needs "
                             "global_batch_info['loss_scale_factor'] (verl divides by the padded response "
                             "length otherwise): pass it, or pass verl's padded [bsz, resp_len] response_mask")
        width = int(lengths.max()) if n_seq else 0
        out = torch.zeros(n_seq, width, dtype=torch.bool, device=device)
        out[seq_id, pos] = m.bool()
        return out
    if m.dim() != 2 or m.shape[0] != n_seq:
        raise ValueError(f"response_mask must be verl's [bsz, resp_len] with bsz={n_seq} (len(cu_seqlens) - 1) "
                         f"or a packed [N] mask, got shape {tuple(m.shape)}")
    if n_seq and int(lengths.max()) > m.shape[1]:
        raise ValueError(f"response_mask has {m.shape[1]} positions per sequence but cu_seqlens holds a "
                         f"sequence of {int(lengths.max())} rows")
    m = m.bool()
    beyond = torch.arange(m.shape[1], device=device)[None, :] >= lengths[:, None]
    if bool((m & beyond).any()):
        raise ValueError("response_mask marks positions past a sequence's length in cu_seqlens: the packed "
                         "rows must hold every response position the mask counts")
    return m


# ----------------------------------------------------------------------------- verl's registered loss
NORMALISERS = ("dp_size", "batch_num_tokens", "global_batch_size")


def normalisers(config, data) -> dict[str, Any]:
    """The global-batch normalisers of a verl micro-batch: ``dp_size``, ``batch_num_tokens``,
    ``global_batch_size`` from ``data`` (the engine's), ``loss_scale_factor`` from the actor ``config``."""
    info = {}
    for key in NORMALISERS:
        try:
            info[key] = data[key]
        except KeyError:
            raise ValueError(f"the verl micro-batch has no {key!r}: verl's engine puts dp_size, batch_num_tokens and "
                             "global_batch_size into every micro-batch it hands a loss function") from None
    info["loss_scale_factor"] = getattr(config, "loss_scale_factor", None)
    return info


def vgs_token_losses(config, distillation_config, model_output: dict, data) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's distillation loss ``"vgs"`` (the signature of verl's ``DistillationLossFn``).

    ``model_output["vgs"]``: ``hidden`` (student, student_text, teacher, teacher_text: [bsz, resp_len, H]
    aligned with ``data["response_mask"]``), ``student_weight`` / ``teacher_weight`` (whole lm_head weights:
    under FSDP2 the call runs inside the root module's forward) and optional ``student_bias`` /
    ``teacher_bias``, and ``loss_kwargs`` (the VGS keywords, ``process_group`` the dp group among them).

    Returns (losses [bsz, resp_len], metrics): ``losses`` = the detached per-token objective (gamma times the
    mode's objective) plus ``(S - S.detach()) / sum(c)`` on the valid tokens, S the VGS loss aggregated with
    verl's coefficients c for the actor's ``loss_agg_mode``: ``agg_loss`` of them is S in value and gradient."""
    from verl.utils.metric import AggregationType, Metric

    loss_config = distillation_config.distillation_loss
    if loss_config.loss_max_clamp is not None:
        raise ValueError("distillation.distillation_loss.loss_max_clamp must be null with loss_mode 'vgs': clamping "
                         "the per-token losses would cut their gradient on the clamped tokens")
    payload = model_output["vgs"]
    mask = data["response_mask"]
    mask = (mask.to_padded_tensor(0) if mask.is_nested else mask).bool()
    hs, hsp, ht, htp = (payload["hidden"][k] for k in ("student", "student_text", "teacher", "teacher_text"))
    coef = agg_coefficients(mask, config.loss_agg_mode, normalisers(config, data)).masked_fill(~mask, 0.0)
    kw = dict(payload.get("loss_kwargs") or {})
    clash = sorted(set(kw) & set(_RESERVED + ("return_per_token",)))
    if clash:
        raise ValueError(f"loss_kwargs must not set {clash}: the verl loss sets them")
    out = fused_linear_vgs_loss(hs, hsp, payload["student_weight"], ht, htp, payload["teacher_weight"], mask,
                                student_bias=payload.get("student_bias"), teacher_bias=payload.get("teacher_bias"),
                                weights=coef.to(hs.device).float(), reduction="sum", return_per_token=True, **kw)
    total = coef.sum()
    unit = (mask.to(coef.dtype) / total).to(out.loss.dtype) if float(total) != 0 else torch.zeros_like(
        mask, dtype=out.loss.dtype)
    losses = out.per_token["objective"].to(out.loss.dtype) + (out.loss - out.loss.detach()) * unit
    metrics = {f"distillation/vgs_{k}": Metric(AggregationType.MEAN, float(v)) for k, v in out.metrics.items()}
    return losses, metrics


def register() -> None:
    """Register :func:`vgs_token_losses` as verl's distillation loss ``"vgs"`` (once; verl's registry refuses
    a second registration of a name). verl's settings demand one of ``use_topk`` / ``use_estimator``: VGS
    uses neither (it reads the full distributions from hidden states), and ``use_estimator`` is the one
    that asks the teacher server for nothing beyond the sampled tokens' log-probabilities."""
    from verl.trainer.distillation.losses import (
        DISTILLATION_LOSS_REGISTRY,
        DistillationLossSettings,
        register_distillation_loss,
    )

    if DISTILLATION_LOSS_REGISTRY.get("vgs") is vgs_token_losses:
        return
    register_distillation_loss(DistillationLossSettings(names=["vgs"], use_estimator=True))(vgs_token_losses)
