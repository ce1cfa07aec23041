"""GRPO with an on-policy distillation regulariser (paper Sec. 8, Eq. 22).

    J = (1 - lambda) * J_GRPO - lambda * L_distill,        minimised as  loss = -J

* J_GRPO is the clipped GRPO surrogate without a KL penalty (Shao et al., 2024):
  for each prompt, G rollouts o_1..o_G with verifiable rewards r_i; group-normalised advantages
  A_i = (r_i - mean(r)) / (std(r) + eps) (std over the group, unbiased as in TRL; ``scale=False`` keeps
  only the mean-centring); per response token the ratio rho = pi(o_t) / pi_old(o_t) and the surrogate
  min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i), averaged over each sequence's tokens and
  then over sequences (``reduction="sequence"``, the GRPO paper's 1/G sum_i 1/|o_i| sum_t), or over all
  tokens (``reduction="token"``).
* L_distill is the pipeline's VGS loss on the same four views (``grpo+opd``: mode ``standard``;
  ``grpo+vgs``: mode ``vgs``); ``grpo`` alone is lambda = 0 (the teacher is not run at all).

With one optimisation step per rollout batch (the default) pi_old is the rollout policy itself, so
rho = 1 and the clip is inactive; it matters with several steps per rollout batch (``iterations``).
lambda = 0 is pure GRPO and lambda = 1 pure distillation (a term whose weight is 0 is not computed).

:class:`GRPOStep` is the trainer's micro-step for the GRPO methods: new rollout groups, or the stored ones
while ``grpo.iterations`` optimizer steps reuse a rollout batch (docs/training.md, "GRPO").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import GRPO_METHODS, TrainConfig
from ..data.rewards import get_reward_fn, score
from ..pipeline.pipe import Pipeline
from ..pipeline.views import ViewBatch


# ---------------------------------------------------------------------------------------------- math
def group_advantages(rewards, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages. ``rewards``: [B*G] (the G rollouts of a prompt contiguous) or
    [B, G]; returns [B*G] fp32: (r - group mean) / (group std + eps), std unbiased (n - 1)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    r = r.reshape(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def sequence_weights(mask: torch.Tensor, reduction: str = "sequence", dtype=torch.float32) -> torch.Tensor:
    """[B, T] token weights summing to 1 over the valid tokens (0 elsewhere); all-False -> zeros."""
    m = mask.to(dtype)
    if reduction == "token":
        return m / m.sum().clamp(min=1.0)
    if reduction != "sequence":
        raise ValueError(f"reduction must be 'sequence' or 'token', got {reduction!r}")
    lengths = m.sum(1, keepdim=True)
    n_seq = (lengths > 0).sum().clamp(min=1)
    return m / lengths.clamp(min=1.0) / n_seq


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, *, epsilon: float = 0.2, epsilon_high: float | None = None,
                      reduction: str = "sequence") -> tuple[torch.Tensor, dict]:
    """The GRPO clipped surrogate J (to maximise) and detached metrics.

    logp, old_logp: [B, T] log-probabilities of the sampled tokens under the current / rollout policy;
    advantages: [B]; mask: [B, T] bool. Returns (J scalar, {ratio_mean, clip_fraction})."""
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    mask = mask.bool()
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.to(logp.dtype).reshape(-1, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_hi) * adv
    per_token = torch.minimum(unclipped, clipped)
    w = sequence_weights(mask, reduction, per_token.dtype)
    j = (per_token * w).sum()
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        metrics = {"ratio_mean": float((ratio * mask).sum() / n),
                   "clip_fraction": float(((clipped < unclipped) & mask).sum() / n)}
    return j, metrics


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None,
                   *, bias: torch.Tensor | None = None, vocab_size: int | None = None, temperature: float = 1.0,
                   chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(W h / temperature)[id] for each token: [B, T] fp32 (0 where ``mask`` is False).

    Only the first ``vocab_size`` lm_head rows count (as in the loss). Rows are processed in chunks under
    activation checkpointing, so at most one chunk of [chunk, V] logits is alive (forward or backward)."""
    lead = ids.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = ids.reshape(-1)
    valid = (mask.reshape(-1).bool() if mask is not None else torch.ones_like(y, dtype=torch.bool)).nonzero().squeeze(1)
    V = vocab_size or weight.shape[0]
    w = weight[:V]
    b = None if bias is None else bias[:V]

    def rows(hc, yc, w_, b_):
        z = F.linear(hc, w_.to(hc.dtype), None if b_ is None else b_.to(hc.dtype)).float() / temperature
        return z.gather(1, yc.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)

    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, valid.numel(), chunk_size):
        idx = valid[s:s + chunk_size]
        args = (h.index_select(0, idx), y.index_select(0, idx), w, b)
        parts.append(checkpoint(rows, *args, use_reentrant=False) if grad else rows(*args))
    out = torch.zeros(y.numel(), dtype=torch.float32, device=hidden.device)
    if parts:
        out = out.index_put((valid,), torch.cat(parts))
    return out.view(lead)


def combine(j_grpo: torch.Tensor | None, distill: torch.Tensor | None, lam: float) -> torch.Tensor:
    """loss = -[(1 - lam) * J_GRPO - lam * L_distill]; a term with weight 0 may be None."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam!r}")
    loss = None
    if lam < 1.0:
        if j_grpo is None:
            raise ValueError("J_GRPO is needed when lambda < 1")
        loss = -(1.0 - lam) * j_grpo
    if lam > 0.0:
        if distill is None:
            raise ValueError("the distillation loss is needed when lambda > 0")
        loss = lam * distill if loss is None else loss + lam * distill
    return loss


# ---------------------------------------------------------------------------------------------- models
@dataclass
class GRPOBatch:
    """One rollout batch: B prompts x G rollouts, their rewards and advantages."""

    views: ViewBatch
    rewards: torch.Tensor  # [B*G]
    correct: torch.Tensor  # [B*G] bool (exact match, for the accuracy log)
    advantages: torch.Tensor  # [B*G]
    texts: list
    group_size: int = 1
    old_logp: torch.Tensor | None = None  # [B*G, T], filled by the first optimisation step
    time_rollout: float = 0.0
    truncated: float = 0.0  # share of the rollouts without an end token


@torch.no_grad()
def rollout_groups(pipe: Pipeline, rows, group_size: int, reward_fn="exact_match", *,
                   scale_rewards: bool = True) -> GRPOBatch:
    """G sampled rollouts per prompt (image view) -> views, rewards, group-normalised advantages."""
    r = pipe.sample(rows, group_size)
    rewards, correct = score(get_reward_fn(reward_fn), r.texts, r.answers)
    dev = r.views.mask.device
    rw = torch.tensor(rewards, dtype=torch.float32)
    return GRPOBatch(r.views, rw.to(dev), torch.tensor(correct).to(dev),
                     group_advantages(rw, group_size, scale=scale_rewards).to(dev), r.texts,
                     group_size=group_size, time_rollout=r.seconds, truncated=r.truncated)


def grpo_loss(pipe: Pipeline, batch: GRPOBatch, *, lam: float = 0.3, distill_mode: str | None = "vgs",
              epsilon: float = 0.2, epsilon_high: float | None = None, reduction: str = "sequence",
              policy_temperature: float = 1.0, gamma_fn=None) -> tuple[torch.Tensor, dict]:
    """The Eq. 22 loss on one rollout batch and its logged parts.

    ``distill_mode=None`` (method ``grpo``) is pure GRPO whatever ``lam``; the distillation term is
    ``pipe.loss`` in ``distill_mode`` (its other keywords: the pipeline's). ``batch.old_logp`` is set on the
    first call (rollout policy = current policy) and reused afterwards. ``gamma_fn(hidden, mask) -> gamma``:
    overrides the distillation gamma (``loss.gamma: auto`` measures it on this batch's hidden states)."""
    lam = 0.0 if distill_mode is None else float(lam)
    views = batch.views
    hidden = pipe.hidden(views, teacher=lam > 0.0)
    m: dict = {}
    j = None
    if lam < 1.0:
        head = pipe.student_head
        logp = token_logprobs(hidden.student, head.weight, views.completion_ids, views.mask,
                              bias=getattr(head, "bias", None), vocab_size=pipe.vocab_size,
                              temperature=policy_temperature)
        if batch.old_logp is None:
            batch.old_logp = logp.detach()
        j, sm = clipped_surrogate(logp, batch.old_logp, batch.advantages, views.mask, epsilon=epsilon,
                                  epsilon_high=epsilon_high, reduction=reduction)
        m.update(grpo_objective=float(j.detach()), **sm)
    distill = None
    if lam > 0.0:
        kw = {"mode": distill_mode}
        if gamma_fn is not None:
            kw["gamma"] = float(gamma_fn(hidden, views.mask))
        out = pipe.loss(hidden, views.mask, **kw)
        distill = out.loss
        m.update(distill_loss=float(distill.detach()), gamma=float(kw.get("gamma", pipe.loss_kwargs.get("gamma", 1.0))),
                 **out.metrics)
    loss = combine(j, distill, lam)
    mask = views.mask
    m.update(loss=float(loss.detach()), reward=float(batch.rewards.float().mean()),
             reward_std=float(batch.rewards.float().std()) if batch.rewards.numel() > 1 else 0.0,
             accuracy=float(batch.correct.float().mean()), rollout_acc=float(batch.correct.float().mean()),
             response_len=float(mask.sum(1).float().mean()), tokens=int(mask.sum()),
             adv_abs_mean=float(batch.advantages.abs().mean()),
             zero_adv_groups=_zero_groups(batch.advantages, batch.group_size), lam=lam)
    return loss, m


# ---------------------------------------------------------------------------------------------- the step
GRPO_BUFFER = "grpo_buffer"  # the rank file of GRPO's stored rollouts (grpo_buffer_rank<r>.pt)


class GRPOStep:
    """The trainer's micro-step for the GRPO methods (``grpo``, ``grpo+opd``, ``grpo+vgs``).

    A rollout batch (B prompts x G rollouts) serves ``grpo.iterations`` optimizer steps: the first samples
    and stores one batch per micro-batch, the following ones reuse them (the clip is active from the second
    on). The shared position (``uses``) is saved with the trainer's state; each rank's stored batches go to
    its own file (:meth:`rank_files`), as every rank sampled its own rollouts. The micro-step interface:
    :mod:`vgs_train.loops.distill`.

    ``scale(mask) -> float`` multiplies the loss (the trainer's global-normaliser scale over ranks);
    ``gamma_fn``: as in :func:`grpo_loss`."""

    shardable = False  # the log-probabilities read the lm_head outside the model's forward

    def __init__(self, pipe: Pipeline, cfg: TrainConfig, *, scale: Callable[[torch.Tensor], float],
                 in_forward=None, gamma_fn=None):
        # in_forward: unused (GRPO runs with DDP or one process: the lm_head is whole outside the forward)
        self.pipe, self.cfg, self.scale, self.gamma_fn = pipe, cfg, scale, gamma_fn
        self.reward_fn = get_reward_fn(cfg.grpo.reward)
        self.buffer: list[GRPOBatch] = []  # this rank's rollout batches of the current iteration cycle
        self.uses = 0  # optimizer steps the stored batches have served (0 .. iterations - 1)

    def begin(self, micro_batches: int) -> bool:
        """Called before an optimizer step; True when this step reuses the stored rollout batches."""
        reuse = self.uses > 0 and len(self.buffer) == micro_batches
        if not reuse:
            self.buffer, self.uses = [], 0
        return reuse

    def __call__(self, index: int, rows: list | None) -> tuple[torch.Tensor, dict]:
        """Micro-batch ``index`` of the step: new rollout groups of ``rows``, or (``rows`` None) the stored
        batch ``index``. Returns the (scaled) loss to backpropagate and the metrics."""
        cfg, g = self.cfg, self.cfg.grpo
        if rows is None:
            batch, t_roll = self.buffer[index], 0.0
        else:
            batch = rollout_groups(self.pipe, rows, cfg.rollout.samples_per_prompt, self.reward_fn,
                                   scale_rewards=g.scale_rewards)
            if g.iterations > 1:
                self.buffer.append(batch)
            t_roll = batch.time_rollout
        t1 = time.perf_counter()
        loss, m = grpo_loss(self.pipe, batch, lam=g.lam, distill_mode=GRPO_METHODS[cfg.loss.method],
                            epsilon=g.epsilon, epsilon_high=g.epsilon_high, reduction=cfg.loss.reduction,
                            policy_temperature=cfg.rollout.temperature, gamma_fn=self.gamma_fn)
        # both terms are reduced over the same mask: one global-normaliser scale (1 in one process)
        loss = loss * self.scale(batch.views.mask)
        m.update(loss=float(loss.detach()), time_rollout=t_roll, time_forward=time.perf_counter() - t1,
                 truncated=batch.truncated)
        return loss, m

    def end(self) -> None:
        self.uses = (self.uses + 1) % self.cfg.grpo.iterations

    def state_dict(self) -> dict:
        return {"uses": self.uses}

    def load_state_dict(self, state: dict) -> None:
        self.uses = int(state["uses"])

    def checkpoint_state(self) -> list:
        return [self]  # the shared position (uses)

    def rank_files(self) -> dict:
        """This rank's stored batches as plain dicts (loadable with ``weights_only=True``), None when the
        next step samples anew."""
        return {GRPO_BUFFER: [_to_plain(b) for b in self.buffer] if self.uses > 0 else None}

    def restore_rank_files(self, checkpoints, path: str, device) -> None:
        if self.uses > 0:  # mid-way through grpo.iterations
            self.buffer = [_from_plain(b, device) for b in checkpoints.load_rank_state(path, GRPO_BUFFER)]


def _to_plain(batch: GRPOBatch) -> dict:
    return {f.name: getattr(batch, f.name) if f.name != "views" else dataclasses.asdict(batch.views)
            for f in dataclasses.fields(batch)}


def _from_plain(d: dict, device) -> GRPOBatch:
    d = dict(d)
    views = ViewBatch(**d.pop("views")).to(device)
    return GRPOBatch(views=views, **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()})


def _zero_groups(adv: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose advantages are all zero (equal rewards: no GRPO signal)."""
    if group_size < 1 or adv.numel() % group_size:
        return float("nan")
    return float((adv.reshape(-1, group_size).abs().amax(1) == 0).float().mean())
