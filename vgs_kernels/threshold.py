"""VDS thresholds (quantiles over the valid tokens of the batch, optionally of all ranks) and gates."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .options import VGSOptions


def gather_vds(vds: torch.Tensor, scope: str) -> torch.Tensor:
    """1-D VDS values of this rank -> the values of all ranks when ``scope == "global"``.

    Ranks may hold different numbers of valid tokens (all_gather of padded buffers). Every rank
    must call this, even one with no valid token, or the collective hangs.
    """
    if scope != "global" or not (dist.is_available() and dist.is_initialized()):
        return vds
    world = dist.get_world_size()
    if world == 1:
        return vds
    count = torch.tensor([vds.numel()], device=vds.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = torch.zeros(longest, device=vds.device, dtype=vds.dtype)
    padded[: vds.numel()] = vds
    buckets = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buckets, padded)
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
    vds: torch.Tensor, opts: VGSOptions
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Per-token gate (vds > theta) and, in adaptive mode, the ramp weight w in [0, 1].

    vds: 1-D float tensor over this rank's valid tokens. Returns (gate float32 {0, 1},
    w float32 or None, theta used for the gate).
    """
    need_ramp = opts.mode == "adaptive"
    if opts.threshold is None:
        qs = [opts.quantile] + (list(opts.adaptive_quantiles) if need_ramp else [])
        found = quantiles(gather_vds(vds.float(), opts.vds_scope), qs)
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
