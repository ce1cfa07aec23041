"""The materialised reference: every distribution in full, gradients by autograd. The test oracle; it
writes out the definition of docs/math.md.

Memory is O(B*T*V) per stream; use it for checking, not for training at scale.
"""

from __future__ import annotations

import torch

from . import modes
from .backends.torch_rows import scaled_logits
from .driver import DriverResult
from .options import VGSOptions
from .threshold import gate_and_ramp


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities, with 0 * log 0 = 0."""
    a = log_a.exp()
    return torch.where(a == 0, torch.zeros_like(a), a * (log_a - log_b)).sum(-1)


def reference_vgs(
    zs: torch.Tensor,
    zsp: torch.Tensor,
    zt: torch.Tensor,
    ztp: torch.Tensor,
    valid_idx: torch.Tensor,
    weights: torch.Tensor,
    opts: VGSOptions,
    gate: torch.Tensor | None = None,
) -> DriverResult:
    """[N, V] logits (any float dtype), valid row indices [n_valid], reduction weights [n_valid],
    optionally the caller's gate [n_valid] {0, 1} instead of the thresholded VDS.

    Computes in fp32 (fp64 for fp64 inputs) and returns a differentiable loss and per-row losses.
    """
    tau, vocab = opts.temperature, opts.vocab_size or zs.shape[-1]

    xs, xsp, xt, xtp = (scaled_logits(z.index_select(0, valid_idx)[:, :vocab], tau) for z in (zs, zsp, zt, ztp))
    xt, xtp = xt.detach(), xtp.detach()  # the teacher gets no gradient
    ls, lsp, lt, ltp = (torch.log_softmax(x, -1) for x in (xs, xsp, xt, xtp))
    prior = xsp.detach() if opts.detach_target_prior else xsp
    lr = torch.log_softmax(prior + xt - xtp, -1)

    std, vis, lang, vds = _kl(ls, lt), _kl(ls, lr), _kl(lsp, ltp), _kl(lt, ltp)
    gate, ramp, theta = gate_and_ramp(vds.detach(), opts, gate)
    w = (weights * opts.gamma).to(std.dtype)
    per_token = modes.objective(modes.get(opts.mode), {"std": std, "vis": vis, "lang": lang}, opts.alpha, opts.beta,
                                gate, ramp)
    per_row = w * per_token
    stats = torch.stack([std, vis, lang, vds], dim=1).detach().float()
    return DriverResult(loss=per_row.sum(), stats=stats, gate=gate, ramp=ramp, theta=theta, per_row=per_row)
