"""Parameter-gradient vectors: which parameters, their gradients, and the dot products, norms and angles
vgs-calibrate (gamma, Eq. 15) and vgs-analyze (angles per VDS decile) compute between them. A gradient is
a list of fp32 tensors, one per parameter."""

from __future__ import annotations

import math
import re

import torch
import torch.distributed as dist


def select_params(model, pattern: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable (name, parameter) pairs, optionally those whose name matches regex ``pattern``
    (``re.search``). Tied weights appear once."""
    inner = getattr(model, "module", model)
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    if pattern:
        rx = re.compile(pattern)
        named = [(n, p) for n, p in named if rx.search(n)]
    if not named:
        raise ValueError(f"no trainable parameter matches {pattern!r}")
    return named


def param_grads(loss: torch.Tensor, params, *, retain_graph: bool = True) -> list[torch.Tensor]:
    """d loss / d params as fp32 tensors (zeros for parameters the loss does not reach)."""
    ps = [p for _, p in params] if params and isinstance(params[0], tuple) else list(params)
    gs = torch.autograd.grad(loss, ps, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for g, p in zip(gs, ps)]


def mean_over_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average each gradient over the ranks of the default process group, in place (no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for g in grads:
            dist.all_reduce(g)
            g.div_(dist.get_world_size())
    return grads


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Sum over parameters of <a_i, b_i> (each in fp32 or fp64, accumulated in Python floats)."""
    return sum(float(torch.dot(x.reshape(-1), y.reshape(-1))) for x, y in zip(a, b))


def norm(a: list[torch.Tensor]) -> float:
    return math.sqrt(max(dot(a, a), 0.0))


def cosine(a, b) -> float:
    na, nb = norm(a), norm(b)
    return dot(a, b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def angle_deg(cos: float) -> float:
    return math.degrees(math.acos(min(1.0, max(-1.0, cos)))) if cos == cos else float("nan")
