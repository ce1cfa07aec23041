"""Pure-PyTorch row kernel: the ``torch`` backend and the template every compiled backend follows.

The row contract (shared by ``torch``, ``triton``, ``cpu`` and ``cuda``)::

    vgs_rows(zs, zsp, zt, ztp, coef, *, temperature, detach_target_prior, grad_zs, grad_zsp, vocab)
        -> stats [n, 4] float32: (std, vis, lang, vds) per row

* ``zs, zsp, zt, ztp``: [n, V] logits of one dtype (fp32/bf16/fp16/fp64), rows of the student
  with/without image and the teacher with/without image (may be views with a row stride larger
  than V; the last dim is contiguous).
* ``vocab``: None (= V) or the number of leading columns that are real ids: columns
  [vocab, V) are padding (the fused-linear driver runs its GEMMs on the full rows of the lm_head
  weights): probability 0, never read, gradient 0.
* ``coef``: [n, 3] float32, per-row coefficients (c_std, c_vis, c_lang) that already include the
  reduction weight, gamma and the term weight (and any power-of-two gradient scale).
* ``grad_zs``: None or an [n, V] tensor of a floating dtype (the driver passes the logits' dtype;
  fp64 for fp64 inputs), overwritten with
  (c_std * p (log p - log q - std) + c_vis * p (log p - log r - vis)) / tau, rounded to its dtype.
  It may be ``zs`` itself (or ``zsp`` when ``zs`` and ``zsp`` are the same tensor): the kernels
  read every entry before they overwrite it (in-place gradients, as Liger's cross entropy).
* ``grad_zsp``: None or an [n, V] tensor, overwritten with
  (c_lang * p' (log p' - log q' - lang) + c_prior * (r - p)) / tau,
  where c_prior = c_vis unless ``detach_target_prior`` (then 0); it may be ``zsp`` itself.

All arithmetic is fp32 (fp64 for fp64 inputs). ``-inf`` logits are read as ``NEG_LOGIT`` (a finite
stand-in giving probability exactly 0), so masked vocabulary entries never produce NaN.
"""

from __future__ import annotations

import functools
import inspect

import torch

# A finite stand-in for -inf logits: exp() of it underflows to 0, products with 0 stay 0. It stays
# finite in fp32 after division by tau because VGSOptions requires temperature >= 1e-6.
NEG_LOGIT = -1.0e30


def scaled_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n, V] logits of any float dtype -> fp32 (fp64 stays fp64) logits / tau, -inf -> NEG_LOGIT."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    x = z.to(dtype).clamp_min(NEG_LOGIT)
    return x / temperature if temperature != 1.0 else x


def vgs_rows(
    zs: torch.Tensor,
    zsp: torch.Tensor,
    zt: torch.Tensor,
    ztp: torch.Tensor,
    coef: torch.Tensor,
    *,
    temperature: float,
    detach_target_prior: bool,
    grad_zs: torch.Tensor | None = None,
    grad_zsp: torch.Tensor | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """Four KLs per row and (optionally) the logit gradients; see the module docstring."""
    tau = temperature
    width = zs.shape[-1]
    vocab = width if vocab is None else vocab
    # every input is read (into new tensors) before a gradient is written: grads may alias zs / zsp
    zs, zsp, zt, ztp = (z[:, :vocab] for z in (zs, zsp, zt, ztp))
    ls = torch.log_softmax(scaled_logits(zs, tau), dim=-1)
    xsp = scaled_logits(zsp, tau)
    lsp = torch.log_softmax(xsp, dim=-1)
    xt = scaled_logits(zt, tau)
    lt = torch.log_softmax(xt, dim=-1)
    xtp = scaled_logits(ztp, tau)
    ltp = torch.log_softmax(xtp, dim=-1)
    lr = torch.log_softmax(xsp + xt - xtp, dim=-1)
    del xsp, xt, xtp

    p = ls.exp()
    std = (p * (ls - lt)).sum(-1)
    vis = (p * (ls - lr)).sum(-1)
    pp = lsp.exp()
    lang = (pp * (lsp - ltp)).sum(-1)
    vds = (lt.exp() * (lt - ltp)).sum(-1)

    c_std, c_vis, c_lang = (coef[:, i : i + 1].to(ls.dtype) for i in range(3))
    if grad_zs is not None:
        g = p * (c_std * (ls - lt - std[:, None]) + c_vis * (ls - lr - vis[:, None]))
        grad_zs[:, :vocab].copy_(g / tau)
        grad_zs[:, vocab:].zero_()
        del g
    if grad_zsp is not None:
        g = pp * (c_lang * (lsp - ltp - lang[:, None]))
        if not detach_target_prior:
            g += c_vis * (lr.exp() - p)
        grad_zsp[:, :vocab].copy_(g / tau)
        grad_zsp[:, vocab:].zero_()
    return torch.stack([std, vis, lang, vds], dim=1).float()


CONTRACT = inspect.signature(vgs_rows)


def follows_row_contract(kernel):
    """``kernel(zs, zsp, zt, ztp, coef, temperature, detach_target_prior, grad_zs, grad_zsp, vocab)`` (all
    positional) called with the row contract's signature: :func:`vgs_rows`'s names, keyword-only options and
    defaults, declared there once."""

    @functools.wraps(kernel)
    def rows(*args, **kwargs):
        bound = CONTRACT.bind(*args, **kwargs)
        bound.apply_defaults()
        return kernel(*bound.arguments.values())

    rows.__signature__ = CONTRACT
    return rows
