"""The trainer's micro-step for the distillation methods (opd, vgs, vgs-adaptive, language-steering).

A micro-step (this one, :class:`vgs_train.loops.grpo.GRPOStep` for the GRPO methods) is what
:meth:`vgs_train.loops.trainer.Trainer.train_step` runs per micro-batch::

    begin(micro_batches) -> bool     # before an optimizer step: True when it reuses stored rollouts
    step(index, rows) -> (loss, metrics)
    end()                            # after the optimizer step
    checkpoint_state() -> list       # objects saved with the trainer's state (state_dict / load_state_dict)
    rank_files() -> dict | None      # per-rank objects to save with a checkpoint ({name: object})
    restore_rank_files(checkpoints, path, device)
    shardable: bool                  # whether it runs under FSDP / DeepSpeed
"""

from __future__ import annotations

import time

import torch

from ..config import TrainConfig
from ..pipeline.health import prior_gap
from ..pipeline.pipe import Pipeline


class DistillStep:
    """The trainer's micro-step for the distillation methods (opd, vgs, vgs-adaptive, language-steering):
    sample, four decoder passes, the VGS loss (inside the student's forward where the engine needs it,
    ``in_forward``), scaled by ``scale(mask)`` (the global normaliser over ranks)."""

    def __init__(self, pipe: Pipeline, cfg: TrainConfig, *, scale, in_forward, gamma_fn=None):
        self.pipe, self.cfg, self.scale, self.in_forward, self.gamma_fn = pipe, cfg, scale, in_forward, gamma_fn

    shardable = True  # the loss runs inside the student's forward, where FSDP2 / ZeRO-3 gather the lm_head

    def begin(self, micro_batches: int) -> bool:
        return False  # every micro-batch samples new rollouts

    def end(self) -> None:
        pass

    def checkpoint_state(self) -> list:
        return []

    def rank_files(self) -> dict | None:
        return None

    def restore_rank_files(self, checkpoints, path: str, device) -> None:
        pass

    def __call__(self, index: int, rows: list) -> tuple[torch.Tensor, dict]:
        rollout = self.pipe.sample(rows, self.cfg.rollout.samples_per_prompt)
        mask = rollout.views.mask
        t1 = time.perf_counter()
        hidden = self.pipe.hidden(rollout.views)
        t2 = time.perf_counter()
        gamma = self.gamma_fn(hidden, mask) if self.gamma_fn is not None else self.pipe.loss_kwargs["gamma"]
        scale = self.scale(mask)  # a collective before the loss's own (the VDS gather): same order on all ranks

        def loss():  # tensors out: DeepSpeed hooks the outputs of the redirected forward
            out = self.pipe.loss(hidden, mask, gamma=gamma, return_per_token=True)
            return out.loss, out

        loss, out = self.in_forward(loss)
        loss = loss * scale
        return loss, {"loss": loss.item(), **out.metrics, "gamma": gamma, "tokens": int(mask.sum()),
                      "response_len": float(mask.sum(1).float().mean()), "truncated": rollout.truncated,
                      "prior_gap": prior_gap(out.per_token, mask), "rollout_acc": rollout.accuracy,
                      "time_rollout": rollout.seconds, "time_forward": t2 - t1, "time_loss": time.perf_counter() - t2}
