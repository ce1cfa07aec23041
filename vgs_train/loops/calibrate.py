"""Gradient-norm normaliser gamma (paper Eq. 15, App. A): its measurement, ``loss.gamma: auto`` and
writing it into a config (the ``vgs-calibrate`` command line is in :mod:`vgs_train.cli`).

    gamma = ||g_std|| / ||g_std + alpha * g_vis||
          = 1 / sqrt(1 + 2 alpha rho cos(phi) + alpha^2 rho^2),   rho = ||g_vis|| / ||g_std||     (Eq. 23)

g_std and g_vis are the *parameter* gradients of the standard term (mean KL(p||q)) and of the visual
term (mean KL(p||r)) on the student's own rollouts. They are measured with two autograd passes through
the pipeline's loss: mode ``standard`` gives g_std, the steering mode with beta = 0 (``vgs``:
std + alpha*vis) gives the denominator g_std + alpha*g_vis directly, and g_vis = (that - g_std) / alpha.
(For ``adaptive`` the steering term is w_t*vis, for ``language`` it is lang.) docs/math.md, "gamma".

The paper fixes gamma per model because the ratio is stable in training: ``config.GAMMA_PRESETS``
(alpha = 2). ``loss.gamma: auto`` in training measures gamma on each of the first K steps (using that
step's own gamma), then freezes the mean (:class:`AutoGamma`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from ..config import GAMMA_PRESETS, gamma_preset, steering_mode
from ..data.examples import Sampler
from ..data.rng import fork_rng
from ..pipeline.gradients import angle_deg, cosine, mean_over_ranks, norm, param_grads, select_params
from ..pipeline.pipe import Hidden, Pipeline

__all__ = ["GAMMA_PRESETS", "AutoGamma", "calibrate", "gamma_preset", "gamma_stats", "measure_gamma",
           "select_params", "steering_mode", "summarise", "term_gradients", "write_gamma"]

LossFn = Callable[..., object]  # (hidden, mask, **keyword overrides) -> VGSOutput, e.g. Pipeline.loss


# ---------------------------------------------------------------------------------------------- gamma
def term_gradients(loss: LossFn, hidden: Hidden, mask: torch.Tensor, params, *, mode: str = "vgs",
                   alpha: float = 2.0, retain_graph: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(g_std, g_std + alpha * g_steer) over ``params``, each averaged over ranks: two autograd passes of
    ``loss`` (``Pipeline.loss``) on the four response hidden states, with gamma = 1 and beta = 0."""
    kw = dict(gamma=1.0, beta=0.0, alpha=alpha)
    l_std = loss(hidden, mask, mode="standard", **kw).loss
    g_std = mean_over_ranks(param_grads(l_std, params, retain_graph=True))
    l_den = loss(hidden, mask, mode=steering_mode(mode), **kw).loss
    g_den = mean_over_ranks(param_grads(l_den, params, retain_graph=retain_graph))
    return g_std, g_den


def gamma_stats(g_std, g_den, alpha: float) -> dict:
    """||g_std||, ||g_vis||, cos(phi), gamma (direct) and gamma from Eq. 23 (a consistency check)."""
    g_vis = [(d - s) / alpha for s, d in zip(g_std, g_den)]
    n_std, n_den, n_vis = norm(g_std), norm(g_den), norm(g_vis)
    cos = cosine(g_std, g_vis)
    gamma = n_std / n_den if n_den > 0 else float("nan")
    rho = n_vis / n_std if n_std > 0 else float("nan")
    eq23 = 1.0 / math.sqrt(max(1.0 + 2 * alpha * rho * cos + alpha ** 2 * rho ** 2, 1e-30)) \
        if rho == rho and cos == cos else float("nan")
    return {"norm_std": n_std, "norm_vis": n_vis, "norm_steered": n_den, "cos_phi": cos,
            "phi_deg": angle_deg(cos), "rho": rho, "gamma": gamma, "gamma_eq23": eq23}


def measure_gamma(pipe: Pipeline, views, params=None, *, mode: str = "vgs", alpha: float = 2.0) -> dict:
    """gamma statistics of one rollout batch (``views.ViewBatch``) for the student's ``params``
    (default: all trainable)."""
    params = params or select_params(pipe.student)
    g_std, g_den = term_gradients(pipe.loss, pipe.hidden(views), views.mask, params, mode=mode, alpha=alpha,
                                  retain_graph=False)
    out = gamma_stats(g_std, g_den, alpha)
    out["tokens"] = int(views.mask.sum())
    return out


def summarise(steps: list[dict], keys=("norm_std", "norm_vis", "cos_phi", "gamma", "gamma_eq23")) -> dict:
    out = {}
    for k in keys:
        xs = [s[k] for s in steps if s[k] == s[k]]
        mean = sum(xs) / len(xs) if xs else float("nan")
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        out[k] = {"mean": mean, "std": math.sqrt(var)}
    return out


class AutoGamma:
    """``loss.gamma: auto``: on each of the first ``steps`` micro-batches gamma is measured (and that
    value is used for that micro-batch, i.e. the exact Eq. 15 normalisation); then the mean is frozen."""

    def __init__(self, steps: int = 10):
        if steps < 1:
            raise ValueError(f"gamma calibration steps must be >= 1, got {steps}")
        self.steps = steps
        self.history: list[dict] = []
        self.frozen: float | None = None

    @property
    def calibrating(self) -> bool:
        return self.frozen is None

    def measure(self, loss: LossFn, hidden: Hidden, mask, params, *, mode: str = "vgs", alpha: float = 2.0) -> float:
        """Measure gamma on this micro-batch's hidden states (their graph is kept for the real loss)."""
        g_std, g_den = term_gradients(loss, hidden, mask, params, mode=mode, alpha=alpha, retain_graph=True)
        st = gamma_stats(g_std, g_den, alpha)
        self.history.append(st)
        if len(self.history) >= self.steps:
            self.frozen = summarise(self.history)["gamma"]["mean"]
        return st["gamma"] if st["gamma"] == st["gamma"] else 1.0

    @property
    def value(self) -> float:
        if self.frozen is not None:
            return self.frozen
        return self.history[-1]["gamma"] if self.history else 1.0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "history": self.history, "frozen": self.frozen}

    def load_state_dict(self, sd: dict) -> None:
        self.steps, self.history, self.frozen = sd["steps"], list(sd["history"]), sd["frozen"]


# ---------------------------------------------------------------------------------------------- tool
def calibrate(pipe: Pipeline, rows, *, batches: int = 8, batch_size: int = 8, mode: str = "vgs",
              alpha: float = 2.0, params=None, samples_per_prompt: int = 1, seed: int = 0, shuffle: bool = True,
              progress=None) -> dict:
    """gamma per batch on ``batches`` on-policy rollout batches of ``rows``; {"steps", "summary", ...}."""
    params = params or select_params(pipe.student)
    sampler = Sampler(len(rows), seed, shuffle)
    steps = []
    with fork_rng():  # the CPU and CUDA generators: manual_seed below reseeds both
        torch.manual_seed(seed)
        for i in range(batches):
            batch = [rows[j] for j in sampler.next(batch_size)]
            views = pipe.sample(batch, samples_per_prompt).views
            st = measure_gamma(pipe, views, params, mode=mode, alpha=alpha)
            st["step"] = i
            steps.append(st)
            if progress:
                progress(st)
    return {"steps": steps, "summary": summarise(steps), "alpha": alpha, "mode": steering_mode(mode),
            "params": sum(p.numel() for _, p in params), "gamma": summarise(steps)["gamma"]["mean"]}


def write_gamma(gamma: float, out_path: str, config_path: str | None = None, alpha: float | None = None) -> str:
    """Write ``loss.gamma`` (and ``loss.alpha``) into a YAML config: a copy of ``config_path`` (its other
    keys unchanged) or a new file with only those keys."""
    import yaml

    data = {}
    if config_path:
        with open(config_path) as f:
            data = yaml.safe_load(f) or {}
    loss = data.setdefault("loss", {}) or {}
    data["loss"] = loss
    loss["gamma"] = round(float(gamma), 4)
    if alpha is not None:
        loss["alpha"] = float(alpha)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return out_path
