"""Keyword options of the VGS loss, validated once and shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import modes as _modes

MODES = tuple(_modes.MODES)
# sequence / token: means (the paper's trajectory average / over all valid tokens); sum: the caller
# normalises; none: per-token losses shaped like the mask (vgs_loss only)
REDUCTIONS = ("sequence", "token", "sum", "none")
VDS_SCOPES = ("global", "local")
# Smallest accepted temperature: logits are divided by tau, and the finite stand-in for -inf logits
# (torch_rows.NEG_LOGIT = -1e30) must stay finite in fp32 (|x| < 3.4e38) after the division, with
# room for the visual-target logits x_sp + x_t - x_tp (up to ~3x larger).
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class VGSOptions:
    """The loss keywords (everything but the tensors and the backend; their meaning: docs/math.md).

    ``threshold`` is ``None`` (use quantiles of the batch's VDS), a float (the gate threshold
    theta), or, in ``mode="adaptive"`` only, a pair ``(theta_low, theta_high)`` for the ramp.
    ``alpha``, ``beta``, ``gamma`` are finite numbers and ``temperature`` a finite number
    ``>= MIN_TEMPERATURE`` (1e-6; smaller values would overflow the finite stand-in for -inf
    logits); none of them may be a bool. ``detach_target_prior``, ``return_per_token`` and
    ``sync_metrics`` must be real bools (a string such as ``"no"`` is rejected, not read as true).

    ``process_group`` (a ``torch.distributed`` process group, or None for the default group) is the
    group whose ranks' VDS values the quantile gathers with ``vds_scope="global"``; it is refused
    with ``vds_scope="local"``, where nothing is gathered. ``sync_metrics=False`` leaves the metrics
    as tensors on the inputs' device instead of reading them to the host with ``.item()``.
    """

    mode: str = "vgs"
    alpha: float = 2.0
    beta: float = 0.01
    gamma: float = 1.0
    quantile: float = 0.7
    adaptive_quantiles: tuple[float, float] = (0.4, 0.7)
    threshold: float | tuple[float, float] | None = None
    vds_scope: str = "global"
    temperature: float = 1.0
    reduction: str = "sequence"
    vocab_size: int | None = None
    detach_target_prior: bool = True
    return_per_token: bool = False
    process_group: Any = None
    sync_metrics: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.vds_scope not in VDS_SCOPES:
            raise ValueError(f"vds_scope must be one of {VDS_SCOPES}, got {self.vds_scope!r}")
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not _finite(value):
                raise ValueError(f"{name} must be a finite number (not a bool), got {value!r}")
        if not _finite(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature must be a finite number > 0 (not a bool), got {self.temperature!r}")
        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be >= {MIN_TEMPERATURE:g} (smaller values overflow the finite "
                f"stand-in for -inf logits in fp32), got {self.temperature!r}"
            )
        for name in ("detach_target_prior", "return_per_token", "sync_metrics"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
        if not _in_open_unit(self.quantile):
            raise ValueError(f"quantile must lie in (0, 1), got {self.quantile!r}")
        aq = self.adaptive_quantiles
        if (
            not isinstance(aq, (tuple, list))
            or len(aq) != 2
            or not all(_in_open_unit(q) for q in aq)
            or not aq[0] < aq[1]
        ):
            raise ValueError(
                "adaptive_quantiles must be a pair (low, high) with 0 < low < high < 1, "
                f"got {aq!r}"
            )
        object.__setattr__(self, "adaptive_quantiles", (float(aq[0]), float(aq[1])))
        self._check_threshold()
        self._check_process_group()
        if self.vocab_size is not None and (
            isinstance(self.vocab_size, bool)
            or not isinstance(self.vocab_size, int)
            or self.vocab_size < 1
        ):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")

    def _check_threshold(self) -> None:
        t = self.threshold
        if t is None:
            return
        if isinstance(t, (tuple, list)):
            if not _modes.MODES[self.mode].ramped:
                raise ValueError(
                    f"threshold must be a single float in mode={self.mode!r}; a pair "
                    f"(theta_low, theta_high) is only meaningful in mode='adaptive', got {t!r}"
                )
            if len(t) != 2 or not all(_finite(x) for x in t) or not t[0] <= t[1]:
                raise ValueError(
                    f"threshold must be a pair (theta_low, theta_high) with low <= high, got {t!r}"
                )
            object.__setattr__(self, "threshold", (float(t[0]), float(t[1])))
            return
        if not _finite(t):
            raise ValueError(f"threshold must be None, a finite float or (adaptive) a pair, got {t!r}")
        if _modes.MODES[self.mode].ramped:
            raise ValueError(
                f"mode={self.mode!r} needs two thresholds: pass threshold=(theta_low, theta_high) "
                f"or None to use adaptive_quantiles, got {t!r}"
            )
        object.__setattr__(self, "threshold", float(t))


    def _check_process_group(self) -> None:
        pg = self.process_group
        if pg is None:
            return
        if self.vds_scope != "global":
            raise ValueError(
                "process_group is only used with vds_scope='global' (the VDS quantile over the group's "
                f"ranks); vds_scope={self.vds_scope!r} gathers nothing"
            )
        import torch.distributed as dist

        if not (dist.is_available() and isinstance(pg, dist.ProcessGroup)):
            raise ValueError(f"process_group must be a torch.distributed ProcessGroup or None, got {pg!r}")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _in_open_unit(q: object) -> bool:
    return _finite(q) and 0.0 < q < 1.0
