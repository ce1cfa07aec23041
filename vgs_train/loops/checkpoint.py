"""Checkpoints of a training run and the rules of resuming one (docs/training.md, "Checkpoints and resume").

A checkpoint is what ``accelerator.save_state`` writes -- the model and optimizer (sharded under FSDP /
DeepSpeed), every rank's RNG streams (``random_states_<rank>.pkl``) and the objects registered with
``accelerator.register_for_checkpointing`` (the trainer's progress, the data sampler, the health monitor,
the GRPO position, gamma: auto) -- plus one file per rank for state only that rank holds (GRPO's stored
rollouts: accelerate saves registered objects from the main process only).

The folder discipline around it stays ours. accelerate's ``ProjectConfiguration(automatic_checkpoint_naming
=True, total_limit=N)`` would not keep what the resume tests prove:

* it names folders by a save counter, not by the optimizer step, and refuses a name that exists (a run
  resumed from an older checkpoint counts the same numbers again);
* it deletes the oldest checkpoint *before* writing the new one, and writes in place: a kill mid-write
  leaves fewer complete checkpoints than asked for, and a half-written folder that sorts as the newest;
* it never removes the checkpoints *after* the one a run resumed from (they belong to another future).

So a checkpoint is written into ``step_NNNNNNN.tmp`` and renamed when every rank is done; ``latest`` names
the newest; pruning happens after the rename; a step is written once.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import torch

from ..config import TrainConfig, load_config, to_dict

LATEST = "latest"
STEP_DIR = "step_{step:07d}"
RANK_FILE = "{name}_rank{rank}.pt"  # state only this rank holds, e.g. grpo_buffer_rank0.pt
# config keys a resumed run may change; any other difference from the run's config.yaml is refused
# (a longer run, logging, evaluation, where things are, and settings that change speed but not the numbers)
RESUME_MAY_CHANGE = ("run.max_steps", "run.log_every", "run.save_every", "run.keep_checkpoints", "run.progress",
                     "run.tensorboard", "eval.", "embedded.cache_dir", "data.image_root", "data.eval",
                     "model.gradient_checkpointing", "model.attn_implementation", "loss.chunk_size", "loss.backend")


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's note that a tied weight (Qwen3-VL's lm_head = its input embeddings) was stored
    once: safetensors' loader restores the tie, and the resume tests compare every parameter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())


class Progress:
    """The optimizer step a run has reached (registered for checkpointing)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class Checkpoints:
    """``step_NNNNNNN`` folders under ``directory``, ``keep`` of them kept (0: all)."""

    def __init__(self, accelerator, directory: str, keep: int):
        self.accelerator, self.dir, self.keep = accelerator, directory, keep
        self.saved_step: int | None = None  # the newest step on disk from this run (never written twice)

    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.dir, LATEST))

    def latest(self) -> str:
        p = os.path.join(self.dir, LATEST)
        if not os.path.exists(p):
            raise FileNotFoundError(f"--resume: no checkpoint in {self.dir}")
        with open(p) as f:
            return os.path.join(self.dir, f.read().strip())

    def save(self, step: int, rank_state: dict | None = None) -> str:
        """Write the checkpoint of ``step`` (every rank calls it: collectives). ``rank_state``: {name: object}
        this rank saves to its own file (None values are skipped)."""
        acc = self.accelerator
        name = STEP_DIR.format(step=step)
        final = os.path.join(self.dir, name)
        if self.saved_step == step:  # e.g. save_every divides max_steps: the end of the run saves again
            return final
        tmp = final + ".tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        for key, obj in (rank_state or {}).items():
            if obj is not None:
                torch.save(obj, os.path.join(tmp, RANK_FILE.format(name=key, rank=acc.process_index)))
        acc.wait_for_everyone()  # every rank's files are in tmp before the main process renames it
        if acc.is_main_process:
            old = final + ".old"  # a same-step checkpoint (a resumed older one): moved aside, never deleted first
            if os.path.exists(final):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            atomic_write(os.path.join(self.dir, LATEST), name)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(name)
        self.saved_step = step
        acc.wait_for_everyone()
        return final

    def _prune(self, current: str) -> None:
        """Keep ``keep`` checkpoints (the current one among them); steps after the current one are stale (a
        run resumed from an older checkpoint) and go."""
        steps = sorted(d for d in os.listdir(self.dir) if d.startswith("step_") and d[5:].isdigit())
        older = [d for d in steps if d < current]
        drop = [d for d in steps if d > current] + (older[:max(0, len(older) - (self.keep - 1))] if self.keep > 0 else [])
        for d in drop:
            shutil.rmtree(os.path.join(self.dir, d), ignore_errors=True)

    def load(self, path: str) -> None:
        """Restore model, optimizer, this rank's RNG streams and the registered objects from ``path``."""
        acc = self.accelerator
        written_by = len(glob.glob(os.path.join(path, "random_states_*.pkl")))
        if written_by != acc.num_processes:
            # every rank resumes its own RNG streams (and GRPO rollouts), and the model file's parameter names
            # follow the engine's wrapping: a run continues exactly only on the same number of processes
            raise ValueError(f"--resume: {path} was written by {written_by} process(es); resume it with "
                             f"{written_by}, not {acc.num_processes}")
        acc.load_state(path)

    def load_rank_state(self, path: str, name: str):
        """This rank's ``name`` object saved with the checkpoint at ``path``."""
        f = os.path.join(path, RANK_FILE.format(name=name, rank=self.accelerator.process_index))
        return torch.load(f, weights_only=True)


def atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def truncate_log(path: str, step: int) -> None:
    """Keep the JSONL lines of steps up to ``step`` (atomically): a resumed run logs the later ones again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write(path, "".join(lines))


def check_resume_config(cfg: TrainConfig, saved_path: str) -> None:
    """A resumed run continues with the config it started with: refuse other changes than
    ``RESUME_MAY_CHANGE`` (a longer run, logging, evaluation)."""
    if not os.path.exists(saved_path):
        return

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    saved, now = flat(to_dict(load_config(saved_path))), flat(to_dict(cfg))
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise ValueError(f"--resume: the config differs from the run's {saved_path} in " + "; ".join(changed)
                         + " (pass the run's config and overrides again, or start a new run.out_dir)")
