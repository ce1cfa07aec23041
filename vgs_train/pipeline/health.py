"""Training-health signals: collapse of the student's rollouts and the health of its language prior.

VGS's visual target r = softmax(sg(z_sp) + z_t - z_tp) is built from the student's own text-only view.
Where the teacher does not look at the image (low VDS: z_t ~ z_tp) r is the student's text-only
distribution itself, so a student whose text-only prior disagrees with the teacher's there hands that
disagreement to r (weighted by alpha) at every such token. ``prior_gap`` measures it: the mean language
divergence KL(p' || q') over the valid tokens the gate leaves out (VDS at or below the threshold).

A collapsing run shows up in its rollouts before any evaluation: accuracy far under the best it reached,
responses that stop only at ``rollout.max_new_tokens``, and the standard divergence to the teacher rising from
its lowest. :class:`HealthMonitor` watches a moving window of those and warns once per signal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..config import HealthConfig

SIGNALS = {
    "acc_drop": "rollout accuracy fell far under its best",
    "truncated": "many responses hit rollout.max_new_tokens (no end token)",
    "std_rise": "the standard divergence KL(p||q) to the teacher is rising",
    "prior_gap": "the student's text-only prior moved away from the teacher's on low-VDS tokens",
}


def truncated_rows(completion: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[B] bool: which completions [B, T] contain none of ``eos_ids`` (cut at max_new_tokens)."""
    has_eos = torch.zeros(completion.shape[0], dtype=torch.bool, device=completion.device)
    for e in eos_ids:
        has_eos |= (completion == e).any(dim=1)
    return ~has_eos


def truncated_fraction(completion: torch.Tensor, eos_ids: list[int]) -> float:
    """Share of the completions [B, T] that contain none of ``eos_ids`` (cut at max_new_tokens)."""
    return float(truncated_rows(completion, eos_ids).float().mean()) if completion.shape[0] else 0.0


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
    """Feed it each step's metrics (:meth:`update`); it flags the signals that hold on the current window and
    returns the warnings raised for the first time.

    The collapse signals compare the current window with the run's best so far: the highest windowed rollout
    accuracy, the lowest windowed share of truncated responses and the lowest windowed std KL, over the windows
    that lie wholly after the learning-rate warm-up (``warmup_steps``; a run climbs during it, and a baseline
    taken there makes any later rise look like a fall). A run that climbs and then falls back is caught; a run
    that keeps improving never is. The prior gap is watched only where the loss builds the visual target r
    (``watch_prior_gap``: not OPD, not pure GRPO) and against the run's first window, since what is large
    depends on the vocabulary and the task."""

    cfg: HealthConfig = field(default_factory=HealthConfig)
    warmup_steps: int = 0
    watch_prior_gap: bool = True
    best: dict = field(default_factory=dict)  # best window means after the warm-up (max acc, min trunc / std)
    initial: dict = field(default_factory=dict)  # the first full window's means
    warned: set = field(default_factory=set)
    recent: deque = field(default_factory=deque)
    steps: int = 0

    KEYS = ("rollout_acc", "truncated", "std", "prior_gap")
    BEST = {"rollout_acc": max, "truncated": min, "std": min}

    def update(self, metrics: dict) -> tuple[dict, list[str]]:
        """-> (flags {signal: bool} on the current window, warnings raised now for the first time)."""
        self.steps += 1
        self.recent.append({k: metrics.get(k, float("nan")) for k in self.KEYS})
        while len(self.recent) > self.cfg.window:
            self.recent.popleft()
        now = self.window_means()
        full = len(self.recent) == self.cfg.window
        if full and not self.initial:
            self.initial = dict(now)
        flags = self.flags(now) if full else dict.fromkeys(SIGNALS, False)
        # the best so far is updated after the flags: the current window is judged against the earlier ones
        if full and self.steps - self.cfg.window >= self.warmup_steps:
            for k, pick in self.BEST.items():
                if now[k] == now[k]:
                    self.best[k] = pick(self.best.get(k, now[k]), now[k])
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
        """The signals on a full window ``now`` (NaN never flags: every comparison with NaN is False)."""
        c, b, first = self.cfg, self.best, self.initial
        flags = dict.fromkeys(SIGNALS, False)
        if "rollout_acc" in b:
            flags["acc_drop"] = b["rollout_acc"] > 0.05 and now["rollout_acc"] < (1 - c.acc_drop) * b["rollout_acc"]
        low_trunc = b.get("truncated", first["truncated"])
        flags["truncated"] = now["truncated"] > max(c.truncated, 2 * low_trunc)
        if "std" in b:
            flags["std_rise"] = now["std"] > max(c.std_rise * b["std"], b["std"] + 0.5)
        if self.watch_prior_gap:
            g0 = first["prior_gap"]
            flags["prior_gap"] = now["prior_gap"] > max(c.prior_gap_rise * g0, g0 + c.prior_gap_margin)
        return flags

    def message(self, key: str, now: dict) -> str:
        b, first, w = self.best, self.initial, self.cfg.window
        detail = {
            "acc_drop": lambda: f"rollout accuracy {now['rollout_acc']:.2f} (best {w}-step window after the "
                                f"warm-up: {b['rollout_acc']:.2f})",
            "truncated": lambda: f"{now['truncated']:.0%} of responses truncated",
            "std_rise": lambda: f"std KL {now['std']:.3f} (lowest {w}-step window after the warm-up: {b['std']:.3f})",
            "prior_gap": lambda: f"prior gap {now['prior_gap']:.2f} nats (first {w} steps: {first['prior_gap']:.2f}): "
                                 "the visual target r inherits it; warm the student up on the text-only view or "
                                 "lower loss.alpha",
        }[key]()
        return f"health warning ({key}): {SIGNALS[key]}: {detail} over the last {len(self.recent)} steps"

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "initial": dict(self.initial), "warned": sorted(self.warned),
                "recent": list(self.recent), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state["best"])
        self.initial = dict(state["initial"])
        self.warned = set(state["warned"])
        self.recent = deque(state["recent"])
        self.steps = int(state["steps"])
