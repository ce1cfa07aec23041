"""VDS thresholds (quantiles over the valid tokens of the batch, optionally of all ranks) and gates
(docs/math.md, "Gate and ramp")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import modes
from .options import VGSOptions


def gather_vds(vds: torch.Tensor, scope: str, group=None) -> torch.Tensor:
    """1-D VDS values of this rank -> the values of every rank of ``group`` (None: the default process
    group) when ``scope == "global"`` and torch.distributed is initialised; else ``vds`` unchanged.

    This is a collective (two all_gathers; ranks may hold different numbers of valid tokens, even
    none): every rank of the group must make the same sequence of calls. Collectives pair up by
    issue order, so a rank that makes more calls than another (dynamic micro-batching) pairs its
    extra call with the other rank's next collective: a threshold mixed from different batches,
    then a hang or a collective error. Use ``vds_scope="local"``, or ``threshold=`` / ``gate=`` from
    :func:`vds_threshold` computed once per batch, when the ranks' call counts may differ.
    """
    if scope != "global" or not (dist.is_available() and dist.is_initialized()):
        return vds
    world = dist.get_world_size(group)
    if world == 1:
        return vds
    count = torch.tensor([vds.numel()], device=vds.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = torch.zeros(longest, device=vds.device, dtype=vds.dtype)
    padded[: vds.numel()] = vds
    buckets = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buckets, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(buckets, sizes)])


def quantiles(values: torch.Tensor, qs: list[float]) -> list[float]:
    """Linear-interpolation quantiles of a 1-D tensor, as ``torch.quantile``; NaN when empty."""
    if values.numel() == 0:
        return [float("nan")] * len(qs)
    v = values.double()
    if v.numel() > 2**24 - 1:  # torch.quantile's input-size limit: sort and interpolate by hand
        v, _ = v.sort()
        pos = torch.tensor(qs, dtype=torch.float64, device=v.device) * (v.numel() - 1)
        lo = pos.floor().long()
        hi = pos.ceil().long()
        out = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    else:
        out = torch.quantile(v, torch.tensor(qs, dtype=torch.float64, device=v.device))
    return [float(x) for x in out.tolist()]


def gate_and_ramp(
    vds: torch.Tensor, opts: VGSOptions, gate: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Per-token gate (vds > theta) and, in adaptive mode, the ramp weight w in [0, 1].

    vds: 1-D float tensor over this rank's valid tokens. ``gate`` (same length, {0, 1}): the caller's
    gate, used instead of the threshold (theta is then NaN; never in adaptive mode). Returns
    (gate float32 {0, 1}, w float32 or None, theta used for the gate).
    """
    need_ramp = modes.get(opts.mode).ramped
    if gate is not None:
        return gate.float(), None, float("nan")
    if opts.threshold is None:
        qs = [opts.quantile] + (list(opts.adaptive_quantiles) if need_ramp else [])
        found = quantiles(gather_vds(vds.float(), opts.vds_scope, opts.process_group), qs)
        theta = found[0]
        low, high = (found[1], found[2]) if need_ramp else (None, None)
    elif isinstance(opts.threshold, tuple):
        low, high = opts.threshold
        theta = high
    else:
        theta = opts.threshold
        low = high = None
    gate = (vds > theta).float()
    if not need_ramp:
        return gate, None, theta
    if high > low:
        w = ((vds - low) / (high - low)).clamp(0.0, 1.0).float()
    else:  # degenerate ramp (all VDS equal): a step at theta_high
        w = (vds > high).float()
    return gate, w, theta


@dataclass
class VDSThreshold:
    """What :func:`vds_threshold` returns.

    threshold: the gate's theta (a float), or in ``mode="adaptive"`` the pair (theta_low, theta_high);
        pass it as ``threshold=`` to every loss call of the batch. NaN when no token is valid.
    vds: fp32 tensor shaped like the mask ([B, T], or [N] for [N, V] / [N, H] inputs), the teacher's
        Visual Dependency Score KL(q || q') per token, 0 on masked tokens.
    gate: bool tensor shaped like the mask, ``vds > theta`` (theta_high in adaptive mode) on valid
        tokens, False on masked ones; pass slices of it as ``gate=`` (modes vgs / language / standard).
    """

    threshold: float | tuple[float, float]
    vds: torch.Tensor
    gate: torch.Tensor


@torch.no_grad()
def vds_threshold(
    teacher: torch.Tensor,
    teacher_text: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mode: str = "vgs",
    quantile: float = 0.7,
    adaptive_quantiles: tuple[float, float] = (0.4, 0.7),
    temperature: float = 1.0,
    vocab_size: int | None = None,
    vds_scope: str = "global",
    process_group=None,
    chunk_size: int | None = None,
) -> VDSThreshold:
    """The VDS of every valid token of a batch and the gate threshold over them (no gradient).

    For frameworks that split a batch into micro-batches (and ranks that make different numbers
    of loss calls): compute the threshold once over the whole batch here, then pass
    ``threshold=out.threshold`` (or ``gate=`` slices of ``out.gate``) to each micro-batch's loss
    call, which then gathers nothing.

    Args:
        teacher, teacher_text: the teacher's logits with / without the image, [B, T, V] or [N, V];
            or, when ``teacher_weight`` ([V, H]) is given, its hidden states [B, T, H] / [N, H]
            (the logits are then formed chunk by chunk, never all at once; ``teacher_bias`` [V]).
        mask: [B, T] (or [N]) bool, True = token that counts; None = all count.
        mode, quantile, adaptive_quantiles, temperature, vocab_size: as for the loss (pass the
            loss's values; ``mode="adaptive"`` returns the ramp's pair of thresholds).
        vds_scope, process_group: ``"global"`` takes the quantile over the VDS of every rank of
            ``process_group`` (default group) when torch.distributed is initialised: a collective
            that every rank of the group must call; ``"local"``: this rank's tokens only.
        chunk_size: rows per chunk (default: about 64 MiB of fp32 logits per chunk).
    """
    from . import validation as V
    from .backends.torch_rows import scaled_logits

    opts = VGSOptions(mode=mode, quantile=quantile, adaptive_quantiles=adaptive_quantiles,
                      temperature=temperature, vocab_size=vocab_size, vds_scope=vds_scope,
                      process_group=process_group)
    names = ("teacher", "teacher_text")
    if teacher_weight is None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias is only used with teacher_weight (hidden-state inputs)")
        lead = V.check_pairs(names * 2, (teacher, teacher, teacher_text, teacher_text), (2, 3))
        vocab = V.check_vocab(vocab_size, ("teacher", teacher.shape[-1]), ("teacher", teacher.shape[-1]))
    else:
        lead = V.check_pairs(names * 2, (teacher, teacher, teacher_text, teacher_text), (2, 3))
        w = V.check_weight("teacher_weight", teacher_weight, "teacher", teacher)
        b = V.check_bias("teacher_bias", teacher_bias, "teacher_weight", w)
        vocab = V.check_vocab(vocab_size, ("teacher_weight", w.shape[0]), ("teacher_weight", w.shape[0]))
        w = w[:vocab].to(teacher.dtype)
        b = None if b is None else b[:vocab].to(teacher.dtype)
    V.check_chunk_size(chunk_size)
    mask2d = V.check_mask(mask, lead, teacher.device)
    valid_idx = mask2d.reshape(-1).nonzero().squeeze(1)
    flat = [x.reshape(-1, x.shape[-1]) for x in (teacher, teacher_text)]
    chunk = chunk_size or max(1, (64 * 2**20) // (vocab * 4))
    vds = torch.empty(valid_idx.numel(), device=teacher.device)
    for a in range(0, valid_idx.numel(), chunk):
        idx = valid_idx[a : a + chunk]
        rows = [x.index_select(0, idx) for x in flat]
        if teacher_weight is None:
            rows = [r[:, :vocab] for r in rows]
            V.check_sparse_rows(rows[1], rows[0], names[1], names[0], "the VDS KL(q || q') is infinite", idx)
        else:
            rows = [torch.nn.functional.linear(r, w, b) for r in rows]
        if not all(bool(torch.isfinite(r).logical_or(torch.isneginf(r)).all()) for r in rows):
            V.raise_non_finite(dict(zip(names, rows)))
        lt, ltp = (torch.log_softmax(scaled_logits(r, temperature), -1) for r in rows)
        q = lt.exp()
        vds[a : a + chunk] = torch.where(q == 0, torch.zeros_like(q), q * (lt - ltp)).sum(-1).float()
    need_ramp = modes.get(opts.mode).ramped
    qs = list(opts.adaptive_quantiles) if need_ramp else [opts.quantile]
    found = quantiles(gather_vds(vds, opts.vds_scope, opts.process_group), qs)
    threshold = (found[0], found[1]) if need_ramp else found[0]
    n = mask2d.numel()
    full = torch.zeros(n, device=teacher.device)
    full[valid_idx] = vds
    gate = torch.zeros(n, dtype=torch.bool, device=teacher.device)
    gate[valid_idx] = vds > found[-1]
    return VDSThreshold(threshold=threshold, vds=full.view(lead), gate=gate.view(lead))
