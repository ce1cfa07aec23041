"""Training-health signals: collapse of the student's rollouts and the health of its language prior.

VGS's visual target r = softmax(sg(z_sp) + z_t - z_tp) is built from the student's own text-only view.
Where the teacher does not look at the image (low VDS: z_t ~ z_tp) r is the student's text-only
distribution itself, so a student whose text-only prior disagrees with the teacher's there hands that
disagreement to r (weighted by alpha) at every such token. ``prior_gap`` measures it: the mean language
divergence KL(p' || q') over the valid tokens the gate leaves out (VDS at or below the threshold).

A collapsing run shows up in its rollouts before any evaluation: accuracy far under where it started,
responses that stop only at ``rollout.max_new_tokens``, and the standard divergence to the teacher rising.
:class:`HealthMonitor` watches a moving window of those and warns once per signal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .config import HealthConfig

SIGNALS = {
    "acc_drop": "rollout accuracy fell far under its start",
    "truncated": "many responses hit rollout.max_new_tokens (no end token)",
    "std_rise": "the standard divergence KL(p||q) to the teacher is rising",
    "prior_gap": "the student's text-only prior is far from the teacher's on low-VDS tokens",
}


def truncated_fraction(completion: torch.Tensor, eos_ids: list[int]) -> float:
    """Share of the completions [B, T] that contain none of ``eos_ids`` (cut at max_new_tokens)."""
    has_eos = torch.zeros(completion.shape[0], dtype=torch.bool, device=completion.device)
    for e in eos_ids:
        has_eos |= (completion == e).any(dim=1)
    return float((~has_eos).float().mean()) if completion.shape[0] else 0.0


def prior_gap_terms(per_token: dict, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of KL(p' || q'), number of tokens) over the valid tokens outside the gate (VDS at or below the
    threshold): the prior gap's numerator and denominator, for a mean over several batches.
    ``per_token``: the loss's ``return_per_token`` output ([B, T] each)."""
    low = mask.bool() & (per_token["gate"] == 0)
    return per_token["lang"][low].sum(), int(low.sum())


def prior_gap(per_token: dict, mask: torch.Tensor) -> float:
    """Mean KL(p' || q') over the valid tokens outside the gate; NaN when there are none."""
    total, n = prior_gap_terms(per_token, mask)
    return float(total / n) if n else float("nan")


@dataclass
class HealthMonitor:
    """Feed it each step's metrics (:meth:`update`); it keeps the first window as the baseline, flags the
    signals that hold on the current window and returns the warnings raised for the first time."""

    cfg: HealthConfig = field(default_factory=HealthConfig)
    baseline: dict = field(default_factory=dict)
    warned: set = field(default_factory=set)
    recent: deque = field(default_factory=deque)

    KEYS = ("rollout_acc", "truncated", "std", "prior_gap")

    def update(self, metrics: dict) -> tuple[dict, list[str]]:
        """-> (flags {signal: bool} on the current window, warnings raised now for the first time)."""
        self.recent.append({k: metrics.get(k, float("nan")) for k in self.KEYS})
        while len(self.recent) > self.cfg.window:
            self.recent.popleft()
        now = self.window_means()
        if not self.baseline and len(self.recent) == self.cfg.window:
            self.baseline = dict(now)
        flags = self.flags(now)
        new = [k for k, on in flags.items() if on and k not in self.warned]
        self.warned.update(new)
        return flags, [self.message(k, now) for k in new]

    def window_means(self) -> dict:
        out = {}
        for k in self.KEYS:
            vals = [m[k] for m in self.recent if m[k] == m[k]]  # NaN-free
            out[k] = sum(vals) / len(vals) if vals else float("nan")
        return out

    def flags(self, now: dict) -> dict:
        c, b = self.cfg, self.baseline
        full = len(self.recent) == c.window
        flags = dict.fromkeys(SIGNALS, False)
        flags["truncated"] = full and now["truncated"] > c.truncated and not (b and now["truncated"] <= 2 * b["truncated"])
        flags["prior_gap"] = full and now["prior_gap"] > c.prior_gap
        if b:
            flags["acc_drop"] = b["rollout_acc"] > 0.05 and now["rollout_acc"] < (1 - c.acc_drop) * b["rollout_acc"]
            flags["std_rise"] = now["std"] > max(c.std_rise * b["std"], b["std"] + 0.5)
        return flags

    def message(self, key: str, now: dict) -> str:
        b = self.baseline
        detail = {
            "acc_drop": lambda: f"rollout accuracy {now['rollout_acc']:.2f} (first {self.cfg.window} steps: "
                                f"{b['rollout_acc']:.2f})",
            "truncated": lambda: f"{now['truncated']:.0%} of responses truncated",
            "std_rise": lambda: f"std KL {now['std']:.3f} (first {self.cfg.window} steps: {b['std']:.3f})",
            "prior_gap": lambda: f"prior gap {now['prior_gap']:.2f} nats > {self.cfg.prior_gap}: the visual target "
                                 "r inherits it; warm the student up on the text-only view or lower loss.alpha",
        }[key]()
        return f"health warning ({key}): {SIGNALS[key]}: {detail} over the last {len(self.recent)} steps"

    def state_dict(self) -> dict:
        return {"baseline": dict(self.baseline), "warned": sorted(self.warned), "recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = dict(state["baseline"])
        self.warned = set(state["warned"])
        self.recent = deque(state["recent"])
