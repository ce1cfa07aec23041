"""``VGSLoss``: an ``nn.Module`` that holds the loss keywords and calls ``fused_linear_vgs_loss``."""

from __future__ import annotations

import inspect
from typing import Unpack

from torch import nn

from . import validation as V
from .backends import NAMES as BACKEND_NAMES
from .loss import VGSOutput, fused_linear_vgs_loss
from .options import VGSKeywords, VGSOptions

# what forward takes: the tensors of fused_linear_vgs_loss (its keywords go to the constructor)
_CALL = inspect.signature(fused_linear_vgs_loss)
_CONSTRUCTOR = ("chunk_size", "backend", *VGSOptions.__dataclass_fields__)
_FORWARD = _CALL.replace(parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
    p for name, p in _CALL.parameters.items() if name not in _CONSTRUCTOR])


class VGSLoss(nn.Module):
    """Fused-linear VGS loss with fixed keywords.

    >>> loss_fn = VGSLoss(mode="vgs", alpha=2.0, beta=0.01, gamma=0.41, vocab_size=151643)
    >>> out = loss_fn(h_s, h_sp, lm_head_s.weight, h_t, h_tp, lm_head_t.weight, mask)
    """

    def __init__(self, *, chunk_size: int | None = None, backend: str = "auto", **options: Unpack[VGSKeywords]):
        super().__init__()
        # fail at construction, not at the first step
        V.check_chunk_size(chunk_size)
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        self.options = VGSOptions.from_keywords(options, "VGSLoss")
        if self.options.reduction == "none":
            raise ValueError(
                "VGSLoss runs fused_linear_vgs_loss, which refuses reduction='none' (it would need the [N, V] "
                "logits): pass per-token multipliers as weights= to forward with reduction='sum'"
            )
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, *tensors, **per_batch) -> VGSOutput:
        """The tensors of :func:`vgs_kernels.fused_linear_vgs_loss` (hidden states, lm_head weights and
        biases, mask, and per batch ``weights``, ``cu_seqlens``, ``gate``); the keywords are the
        constructor's."""
        try:
            _FORWARD.bind(self, *tensors, **per_batch)
        except TypeError as exc:
            raise TypeError(f"VGSLoss.forward: {exc} (the loss keywords go to the constructor)") from None
        return fused_linear_vgs_loss(*tensors, **per_batch, chunk_size=self.chunk_size, backend=self.backend,
                                     **self.options.keywords())

    forward.__signature__ = _FORWARD

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.options.keywords().items()
                   if v != VGSOptions.__dataclass_fields__[k].default}
        return ", ".join(f"{k}={v!r}" for k, v in {**changed, "chunk_size": self.chunk_size,
                                                     "backend": self.backend}.items())
