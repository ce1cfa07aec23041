"""``VGSLoss``: an ``nn.Module`` that holds the loss keywords and calls ``fused_linear_vgs_loss``."""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from . import validation as V
from .backends import NAMES as BACKEND_NAMES
from .loss import VGSOutput, fused_linear_vgs_loss
from .options import VGSOptions

_OPTION_NAMES = tuple(f.name for f in fields(VGSOptions))


class VGSLoss(nn.Module):
    """Fused-linear VGS loss with fixed keywords.

    >>> loss_fn = VGSLoss(mode="vgs", alpha=2.0, beta=0.01, gamma=0.41, vocab_size=151643)
    >>> out = loss_fn(h_s, h_sp, lm_head_s.weight, h_t, h_tp, lm_head_t.weight, mask)
    """

    def __init__(self, *, chunk_size: int | None = None, backend: str = "auto", **keywords):
        super().__init__()
        # fail at construction, not at the first step
        unknown = sorted(set(keywords) - set(_OPTION_NAMES))
        if unknown:
            raise ValueError(
                f"VGSLoss got unknown keyword(s) {unknown}; expected chunk_size, backend or one of "
                f"{_OPTION_NAMES}"
            )
        V.check_chunk_size(chunk_size)
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        VGSOptions(**keywords)
        if keywords.get("reduction") == "none":
            raise ValueError(
                "VGSLoss runs fused_linear_vgs_loss, which refuses reduction='none' (it would need the [N, V] "
                "logits): pass per-token multipliers as weights= to forward with reduction='sum'"
            )
        self.keywords = dict(keywords, chunk_size=chunk_size, backend=backend)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_text_hidden: torch.Tensor | None,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_text_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        *,
        weights: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
    ) -> VGSOutput:
        """The per-batch tensors (``weights``, ``cu_seqlens``, ``gate``) go here, the fixed keywords
        to the constructor; see :func:`vgs_kernels.fused_linear_vgs_loss`."""
        return fused_linear_vgs_loss(
            student_hidden, student_text_hidden, student_weight,
            teacher_hidden, teacher_text_hidden, teacher_weight, mask,
            student_bias=student_bias, teacher_bias=teacher_bias, weights=weights, cu_seqlens=cu_seqlens,
            gate=gate, **self.keywords,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.keywords.items())
