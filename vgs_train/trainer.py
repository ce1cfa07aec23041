"""The on-policy distillation loop (nanoGPT-style: one readable file).

Per optimizer step, for each of ``grad_accum`` micro-batches:
  1. rollouts: the student samples completions for the image-view prompts (``rollout.engine``);
  2. views: the completion ids are appended unchanged to the image and the text-only prompts;
  3. four forward passes give decoder hidden states at the response positions: student image /
     text-only (with grad), teacher image / text-only (no grad, eval mode);
  4. ``fused_linear_vgs_loss`` with both lm_head weights and the tokenizer's vocabulary size; backward.
Then grad clipping, AdamW (constant LR), logging, checkpointing.

Multi-process (``accelerate launch`` / ``torchrun``; ``vgs_train.distributed``): every rank draws the
same global micro-batch from the seeded sampler and keeps its share (``rank_share``), samples its own
rollouts, and scales its loss by the all-reduced normaliser so that the engine's gradient average is the
single-process gradient on the global batch; the loss runs inside the wrapped student's forward (the
lm_head is whole there under FSDP2 / ZeRO-3); metrics are reduced over ranks; checkpoints are written
once (main process, with every rank's RNG state) and resumed on all ranks.

GRPO methods (``grpo``, ``grpo+opd``, ``grpo+vgs``; paper Sec. 8, Eq. 22) sample G =
``rollout.samples_per_prompt`` rollouts per prompt, score them with the verifiable reward and minimise
-(1 - lambda) * J_GRPO + lambda * L_distill (``vgs_train.grpo``). ``loss.gamma: auto`` measures gamma
(Eq. 15) on each of the first ``loss.gamma_calibration_steps`` micro-batches, then freezes the mean
(``vgs_train.calibrate.AutoGamma``; written to ``gamma.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import random
import shutil
import signal
import time

import torch

from vgs_kernels import fused_linear_vgs_loss

from .calibrate import AutoGamma, select_params
from .config import GRPO_METHODS, TrainConfig, save_config, to_dict
from .data import Sampler, load_dataset_rows
from .distributed import (
    any_rank,
    configure_deepspeed,
    gather_objects,
    global_counts,
    prepare_sharded_lm_head,
    rank_share,
    reduce_metrics,
    run_with_lm_head,
    whole_init,
)
from .evaluate import evaluate, is_correct
from .grpo import GRPOBatch, grpo_loss, rollout_groups
from .health import HealthMonitor, prior_gap, truncated_fraction
from .modeling import check_same_tokenizer, load_model, load_processor
from .rewards import get_reward_fn
from .rollout import ENGINES
from .views import PromptBuilder, ViewBatch, build_views, four_view_hidden, repeat_prompt

STATE_FILE, MODEL_FILE, OPTIM_FILE = "trainer_state.pt", "model.safetensors", "optimizer.pt"
GRPO_BUFFER_FILE = "grpo_buffer_rank{rank}.pt"  # a rank's stored rollouts, mid-way through grpo.iterations
# config keys a resumed run may change; any other difference from the run's config.yaml is refused
# (a longer run, logging, evaluation, where things are, and settings that change speed but not the numbers)
RESUME_MAY_CHANGE = ("run.max_steps", "run.log_every", "run.save_every", "run.keep_checkpoints", "run.progress",
                     "run.tensorboard", "eval.", "embedded.cache_dir", "data.image_root", "data.eval",
                     "model.gradient_checkpointing", "model.attn_implementation", "loss.chunk_size", "loss.backend")


def resolve_paths(cfg: TrainConfig, verbose: bool = True) -> dict:
    """Model and data paths, preparing the embedded default when asked for ("tiny" / "synthetic")."""
    need = "tiny" in (cfg.model.student, cfg.model.teacher) or "synthetic" in (cfg.data.train, cfg.data.eval)
    emb = None
    if need:
        from .embedded import prepare_embedded

        emb = prepare_embedded(cfg, verbose=verbose)

    def pick(value, key):
        return emb[key] if value in ("tiny", "synthetic") else value

    return {"student": pick(cfg.model.student, "student"), "teacher": pick(cfg.model.teacher, "teacher"),
            "train": pick(cfg.data.train, "train"), "eval": pick(cfg.data.eval, "eval") if cfg.data.eval else ""}


def learning_rate(oc, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over ``optim.warmup_steps``
    (AdamW's first updates are its largest relative to the gradient: a cold start at full rate can wreck a
    small model), then constant (the paper's schedule)."""
    if oc.warmup_steps and step < oc.warmup_steps:
        return oc.lr * (step + 1) / oc.warmup_steps
    return oc.lr


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | bool = False, verbose: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.verbose = cfg, verbose
        cuda = torch.cuda.is_available()
        mp = "bf16" if (cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and cuda)) else "no"
        self.accelerator = Accelerator(mixed_precision=mp, cpu=not cuda)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.verbose = verbose and self.accelerator.is_main_process
        if cfg.is_grpo and self._sharded:
            raise ValueError(f"loss.method={cfg.loss.method} runs with DDP or one process; FSDP / DeepSpeed shard "
                             "the lm_head that GRPO's log-probabilities read outside the model's forward")
        if self.world > 1 and cfg.loss.gamma == "auto":
            raise ValueError("loss.gamma=auto calibrates on one process; with several processes measure gamma "
                             "with vgs-calibrate and pass the number (or a preset)")
        set_seed(cfg.run.seed + self.rank)  # rank 0 (and a single process) keeps the run's seed
        with self.accelerator.main_process_first():  # the embedded default is prepared once
            self.paths = resolve_paths(cfg, self.verbose)
        self.run_dir = os.path.abspath(cfg.run.out_dir)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if resume:  # before any model loads
            check_resume_config(cfg, os.path.join(self.run_dir, "config.yaml"))

        self.processor = load_processor(self.paths["student"])
        teacher_processor = load_processor(self.paths["teacher"])
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        student = load_model(self.paths["student"], attn_implementation=cfg.model.attn_implementation)
        # the teacher never trains: keep it in bf16 under mixed precision (the student keeps fp32 master weights);
        # it is replicated, so it is loaded whole even under ZeRO-3's partitioned init
        with whole_init():
            teacher = load_model(self.paths["teacher"], dtype=torch.bfloat16 if mp == "bf16" else torch.float32,
                                 attn_implementation=cfg.model.attn_implementation)
        self.vocab_size = check_same_tokenizer(self.tokenizer, getattr(teacher_processor, "tokenizer",
                                                                       teacher_processor), student, teacher)
        if cfg.model.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        student.train()
        teacher.eval().requires_grad_(False)
        oc = cfg.optim
        opt = torch.optim.AdamW(student.parameters(), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                weight_decay=oc.weight_decay)
        configure_deepspeed(self.accelerator, oc.batch_size * cfg.rollout.samples_per_prompt, oc.grad_accum)
        self.student, self.optimizer = self.accelerator.prepare(student, opt)
        prepare_sharded_lm_head(self.student)  # ZeRO-3: the lm_head weight is gathered for the root's forward
        # the teacher is inference-only: replicated on every rank, never prepared (no optimizer state)
        self.teacher = teacher.to(self.accelerator.device)
        rc = cfg.rollout
        self.engine = ENGINES[rc.engine](self.tokenizer, max_new_tokens=rc.max_new_tokens,
                                         temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                                         vocab_rows=_rows(self.unwrapped.get_output_embeddings().weight))
        self.builder = PromptBuilder(self.processor, cfg.data.system_prompt or None)
        self.rows = load_dataset_rows(self.paths["train"], cfg.data.image_root)
        if cfg.data.max_prompt_length:
            self.rows = self._drop_long_prompts(self.rows, cfg.data.max_prompt_length)
        self.sampler = Sampler(len(self.rows), cfg.run.seed, cfg.data.shuffle)
        self.loss_kwargs = cfg.loss_kwargs()
        self.auto_gamma = AutoGamma(cfg.loss.gamma_calibration_steps) if cfg.loss.gamma == "auto" else None
        self.reward_fn = get_reward_fn(cfg.grpo.reward) if cfg.is_grpo else None
        self._grpo_buffer: list = []  # rollout batches reused for grpo.iterations optimizer steps
        self._grpo_uses = 0
        self.health = HealthMonitor(cfg.health)
        self.step = 0
        self._saved_step = None  # the step of the newest checkpoint on disk (not written twice)
        self._stop_signal = None
        if resume:
            self.load_checkpoint(resume if isinstance(resume, str) else self.latest_checkpoint())
        elif os.path.exists(os.path.join(self.ckpt_dir, "latest")):
            raise FileExistsError(f"{self.run_dir} already has checkpoints: pass --resume to continue it, or "
                                  "choose another run.out_dir")

    def _drop_long_prompts(self, rows: list, limit: int) -> list:
        lengths = self.builder.prompt_lengths(rows)
        kept = [r for r, n in zip(rows, lengths) if n <= limit]
        if not kept:
            raise ValueError(f"data.max_prompt_length={limit}: every training prompt is longer "
                             f"(shortest {min(lengths)} tokens)")
        if self.verbose and len(kept) < len(rows):
            print(f"data.max_prompt_length={limit}: dropped {len(rows) - len(kept)} of {len(rows)} training rows "
                  f"(longest prompt {max(lengths)} tokens)", flush=True)
        return kept

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.student)

    # ------------------------------------------------------------------ gamma: auto
    def _weights(self):
        return self.unwrapped.get_output_embeddings().weight, self.teacher.get_output_embeddings().weight

    def _gamma(self, hidden, mask) -> float:
        """gamma for this micro-batch: measured (Eq. 15) while ``loss.gamma: auto`` calibrates, then frozen."""
        ag = self.auto_gamma
        if not ag.calibrating:
            return ag.value
        if not hasattr(self, "_gamma_params"):
            self._gamma_params = select_params(self.unwrapped)
        mode = self.cfg.loss_mode
        kw = {k: v for k, v in self.loss_kwargs.items() if k not in ("mode", "alpha")}
        g = ag.measure(hidden, self._weights(), mask, self._gamma_params, mode=mode, alpha=self.cfg.loss.alpha,
                       vocab_size=self.vocab_size, loss_kwargs=kw)
        if not ag.calibrating:
            self._gamma_frozen()
        return g

    def _gamma_frozen(self) -> None:
        from .calibrate import summarise

        ag = self.auto_gamma
        info = {"gamma": ag.frozen, "steps": ag.steps, "summary": summarise(ag.history), "history": ag.history,
                "alpha": self.cfg.loss.alpha, "frozen_at_step": self.step + 1}
        if self.accelerator.is_main_process:
            os.makedirs(self.run_dir, exist_ok=True)
            _atomic_write(os.path.join(self.run_dir, "gamma.json"), json.dumps(info, indent=2))
        if self.verbose:
            sm = info["summary"]["gamma"]
            print(f"\ngamma: auto -> {ag.frozen:.4f} (mean over {ag.steps} calibration micro-batches, std "
                  f"{sm['std']:.4f}); frozen from now on", flush=True)

    # ------------------------------------------------------------------ one optimizer step
    def micro_step(self, rows, batch=None) -> dict:
        if self.cfg.is_grpo:
            return self.grpo_micro_step(rows, batch)
        dev = self.accelerator.device
        n = self.cfg.rollout.samples_per_prompt
        t0 = time.perf_counter()
        img = repeat_prompt(self.builder.encode(rows, with_image=True), n)
        txt = repeat_prompt(self.builder.encode(rows, with_image=False), n)
        img = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in img.items()}
        txt = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in txt.items()}
        with self.accelerator.autocast():
            completion, mask = self.engine.generate(self.student, img, do_sample=True)
        t1 = time.perf_counter()
        views = build_views(img, txt, completion, mask)
        with self.accelerator.autocast():
            hs, hsp, ht, htp = four_view_hidden(self.student, self.teacher, views)
        t2 = time.perf_counter()
        kw = dict(self.loss_kwargs)
        if self.auto_gamma is not None:
            kw["gamma"] = self._gamma((hs, hsp, ht, htp), views.mask)

        def vgs():
            return fused_linear_vgs_loss(
                hs, hsp, self.unwrapped.get_output_embeddings().weight,
                ht, htp, self.teacher.get_output_embeddings().weight, views.mask,
                vocab_size=self.vocab_size, return_per_token=True, **kw)

        if self.world > 1 or self._sharded:
            # inside the wrapped student's and the lm_head's forward (whole lm_head under FSDP2 / ZeRO-3),
            # scaled so that the gradient average over ranks is the gradient of the global batch's loss
            counts = global_counts(views.mask)
            loss, out = run_with_lm_head(self.student, self.unwrapped, lambda: (lambda o: (o.loss, o))(vgs()))
            loss = loss * counts.scale(self.cfg.loss.reduction)
        else:
            out = vgs()
            loss = out.loss
        self.accelerator.backward(loss / self.cfg.optim.grad_accum, **self._backward_kwargs())
        t3 = time.perf_counter()
        texts = self.tokenizer.batch_decode(completion.masked_fill(~mask, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        answers = [r.answer for r in rows for _ in range(n)]
        return {"loss": loss.item(), **out.metrics, "gamma": kw["gamma"], "tokens": int(mask.sum()),
                "response_len": float(mask.sum(1).float().mean()),
                "truncated": truncated_fraction(completion, self.engine.eos_ids),
                "prior_gap": prior_gap(out.per_token, views.mask),
                "rollout_acc": sum(is_correct(t, a) for t, a in zip(texts, answers)) / len(texts),
                "time_rollout": t1 - t0, "time_forward": t2 - t1, "time_loss_backward": t3 - t2}

    def grpo_micro_step(self, rows, batch=None) -> dict:
        """GRPO + distillation (Eq. 22) on new rollouts of ``rows`` or on a stored rollout ``batch``."""
        cfg, g = self.cfg, self.cfg.grpo
        if batch is None:
            with self.accelerator.autocast():
                batch = rollout_groups(self.student, self.engine, self.builder, rows, cfg.rollout.samples_per_prompt,
                                       self.reward_fn, scale_rewards=g.scale_rewards,
                                       device=self.accelerator.device)
            if g.iterations > 1:
                self._grpo_buffer.append(batch)
            t_roll = batch.time_rollout
        else:
            t_roll = 0.0
        t1 = time.perf_counter()
        loss, m = grpo_loss(self.student, self.teacher, batch, lam=g.lam, distill_mode=GRPO_METHODS[cfg.loss.method],
                            epsilon=g.epsilon, epsilon_high=g.epsilon_high, reduction=cfg.loss.reduction,
                            policy_temperature=cfg.rollout.temperature, vocab_size=self.vocab_size,
                            distill_kwargs=self.loss_kwargs, autocast=self.accelerator.autocast,
                            gamma_fn=self._gamma if self.auto_gamma is not None else None)
        t2 = time.perf_counter()
        if self.world > 1:  # both terms are reduced over the same mask: one global-normaliser scale (DDP)
            loss = loss * global_counts(batch.views.mask).scale(cfg.loss.reduction)
            m["loss"] = float(loss.detach())
        self.accelerator.backward(loss / cfg.optim.grad_accum, **self._backward_kwargs())
        t3 = time.perf_counter()
        m.update(time_rollout=t_roll, time_forward=t2 - t1, time_loss_backward=t3 - t2,
                 truncated=truncated_fraction(batch.views.completion_ids, self.engine.eos_ids))
        return m

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        oc = self.cfg.optim
        parts = []
        reuse = self.cfg.is_grpo and self._grpo_uses > 0 and len(self._grpo_buffer) == oc.grad_accum
        if not reuse:
            self._grpo_buffer, self._grpo_uses = [], 0
        for a in range(oc.grad_accum):
            # gradients are reduced over ranks (DDP / FSDP2) and DeepSpeed steps on the last micro-batch only
            last = a == oc.grad_accum - 1
            self.accelerator.sync_gradients = last
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.student):
                if reuse:
                    parts.append(self.micro_step(None, self._grpo_buffer[a]))
                else:
                    # every rank draws the same global micro-batch and keeps its share
                    rows = [self.rows[i] for i in rank_share(self.sampler.next(oc.batch_size * self.world),
                                                             self.rank, self.world)]
                    parts.append(self.micro_step(rows))
        if self.cfg.is_grpo:
            self._grpo_uses = (self._grpo_uses + 1) % self.cfg.grpo.iterations
        grad_norm = self.accelerator.clip_grad_norm_(self.student.parameters(), oc.grad_clip) \
            if oc.grad_clip > 0 else torch.tensor(float("nan"))
        for group in self.optimizer.param_groups:  # a function of the step alone: resume needs no scheduler state
            group["lr"] = learning_rate(oc, self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        m = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0] if k not in ("tokens",)}
        for k in ("time_rollout", "time_forward", "time_loss_backward"):
            m[k] = sum(p[k] for p in parts)
        m["tokens"] = sum(p["tokens"] for p in parts)
        if self.world > 1:  # token-weighted means of the VGS metrics; the loss is the mean of scaled losses
            m = reduce_metrics(m, weight=m["tokens"], sum_keys=("tokens",),
                               mean_keys=("loss", "gamma", "response_len", "rollout_acc", "truncated", "time_rollout",
                                          "time_forward", "time_loss_backward"))
        m["step_time"] = time.perf_counter() - t0
        m["tokens_per_s"] = m["tokens"] / max(m["step_time"], 1e-9)
        m["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)  # DeepSpeed: None at times
        m["lr"] = self.optimizer.param_groups[0]["lr"]
        m["step"] = self.step
        return m

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> str:
        p = os.path.join(self.ckpt_dir, "latest")
        if not os.path.exists(p):
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir}")
        with open(p) as f:
            return os.path.join(self.ckpt_dir, f.read().strip())

    def _backward_kwargs(self) -> dict:
        """The loss is already divided by the accumulation steps: DeepSpeed must not divide it again."""
        from accelerate.utils import DistributedType

        return {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}

    @property
    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save_checkpoint(self) -> str:
        """Model (safetensors), optimizer, RNG and data position, written atomically (tmp dir + rename).

        Every rank calls it (collectives); the main process writes, with every rank's RNG state. Under
        FSDP / DeepSpeed the model and optimizer are sharded: ``accelerator.save_state`` writes them."""
        from safetensors.torch import save_model

        name = f"step_{self.step:07d}"
        final = os.path.join(self.ckpt_dir, name)
        if self._saved_step == self.step:  # e.g. save_every divides max_steps: the end of the run saves again
            return final
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rngs = gather_objects(rng) if self.world > 1 else [rng]
        tmp = final + ".tmp"
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        if self._grpo_uses > 0:  # mid-way through grpo.iterations: each rank keeps its rollout batches
            self.accelerator.wait_for_everyone()
            torch.save([_to_plain(b) for b in self._grpo_buffer],
                       os.path.join(tmp, GRPO_BUFFER_FILE.format(rank=self.rank)))
            self.accelerator.wait_for_everyone()  # every rank's file is in tmp before the main process renames it
        self._saved_step = self.step
        if self._sharded:
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(os.path.join(tmp, "accelerate_state"))
        if not main:
            self.accelerator.wait_for_everyone()
            return final
        if not self._sharded:
            save_model(self.unwrapped, os.path.join(tmp, MODEL_FILE))
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, OPTIM_FILE))
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "rng": rng, "rng_ranks": rngs,
                 "grpo_uses": self._grpo_uses}
        if self.auto_gamma is not None:
            state["auto_gamma"] = json.dumps(self.auto_gamma.state_dict())
        state["health"] = json.dumps(self.health.state_dict())
        torch.save(state, os.path.join(tmp, STATE_FILE))
        old = final + ".old"  # a same-step checkpoint (a resumed older one): moved aside, never deleted first
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _atomic_write(os.path.join(self.ckpt_dir, "latest"), name)
        shutil.rmtree(old, ignore_errors=True)
        self._prune_checkpoints(name)
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self, current: str) -> None:
        """Keep ``run.keep_checkpoints`` (the current one among them); steps after the current one are
        stale (a run resumed from an older checkpoint) and go."""
        keep = self.cfg.run.keep_checkpoints
        steps = sorted(d for d in os.listdir(self.ckpt_dir) if d.startswith("step_") and d[5:].isdigit())
        older = [d for d in steps if d < current]
        drop = [d for d in steps if d > current] + (older[:max(0, len(older) - (keep - 1))] if keep > 0 else [])
        for d in drop:
            shutil.rmtree(os.path.join(self.ckpt_dir, d), ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_model as load_st

        if os.path.isdir(os.path.join(path, "accelerate_state")):  # FSDP / DeepSpeed (sharded)
            self.accelerator.load_state(os.path.join(path, "accelerate_state"))
        else:
            load_st(self.unwrapped, os.path.join(path, MODEL_FILE))
            self.optimizer.load_state_dict(torch.load(os.path.join(path, OPTIM_FILE), weights_only=True))
        st = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
        self.step = self._saved_step = int(st["step"])
        self.sampler.load_state_dict(st["sampler"])
        self._grpo_uses = int(st.get("grpo_uses", 0))
        if self._grpo_uses > 0:
            buf = torch.load(os.path.join(path, GRPO_BUFFER_FILE.format(rank=self.rank)), weights_only=True)
            self._grpo_buffer = [_from_plain(b, self.accelerator.device) for b in buf]
        if self.accelerator.is_main_process:  # lines logged after this checkpoint are logged again
            for log in ("metrics.jsonl", "eval.jsonl"):
                _truncate_log(os.path.join(self.run_dir, log), self.step)
        if "health" in st:
            self.health.load_state_dict(json.loads(st["health"]))
        if self.auto_gamma is not None and "auto_gamma" in st:
            self.auto_gamma.load_state_dict(json.loads(st["auto_gamma"]))
        ranks = st.get("rng_ranks") or [st["rng"]]
        rng = ranks[self.rank] if len(ranks) == self.world else st["rng"]  # other world size: rank 0's
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.verbose:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, _frame):
        self._stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    def train(self, on_step=None) -> list[dict]:
        """Run to ``run.max_steps``; returns the per-step metrics. ``on_step(metrics, warnings)``, when given,
        is called after every step with the health warnings raised at it (the caller shows them then)."""
        cfg = self.cfg
        main = self.accelerator.is_main_process
        if main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
            _atomic_write(os.path.join(self.run_dir, "paths.json"), json.dumps(self.paths, indent=2))
        self.accelerator.wait_for_everyone()
        writer = None
        if cfg.run.tensorboard and self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events logged after its checkpoint
            writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self.step + 1 if self.step else None)
        bar = None
        if cfg.run.progress and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.run.max_steps, initial=self.step, desc=f"{cfg.loss.method}", dynamic_ncols=True)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        history = []
        try:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") if main else _Null() as mf:
                while self.step < cfg.run.max_steps:
                    m = self.train_step()
                    flags, warnings = self.health.update(m)
                    m.update({f"health_{k}": int(v) for k, v in flags.items()})
                    history.append(m)
                    if on_step is not None:
                        on_step(m, warnings)
                    elif main:  # printed even when not verbose: a collapse must be seen
                        for w in warnings:
                            (bar.write if bar is not None else print)(f"step {self.step}: {w}")
                    if main and (self.step % cfg.run.log_every == 0 or self.step == cfg.run.max_steps):
                        mf.write(json.dumps(m) + "\n")
                        mf.flush()
                        if writer is not None:
                            for k, v in m.items():
                                if k != "step" and isinstance(v, (int, float)):
                                    writer.add_scalar(f"train/{k}", v, self.step)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "std", "vis", "reward", "gamma")
                                         if k in m} | {"acc": f"{m['rollout_acc']:.2f}"})
                    if cfg.eval.every and self.step % cfg.eval.every == 0:
                        self.log_eval(writer)
                    # a signal that reached any rank stops all of them (after a checkpoint)
                    if any_rank(self._stop_signal is not None) if self.world > 1 else self._stop_signal is not None:
                        sig = self._stop_signal or signal.SIGTERM
                        path = self.save_checkpoint()
                        if main:
                            print(f"\nsignal {sig}: checkpoint written to {path}; exiting", flush=True)
                        raise SystemExit(128 + sig)
                    if cfg.run.save_every and self.step % cfg.run.save_every == 0:
                        self.save_checkpoint()
            self.save_checkpoint()
            self.save_final()
            if cfg.eval.at_end and self.paths.get("eval"):
                self.log_eval(writer)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return history

    def close(self) -> None:
        """End the run's process group once every rank got here. Call it on success (or on the signal stop,
        which all ranks take at the same step) only: a rank that failed would leave the others waiting."""
        # FSDP2 / DDP state is cyclic; freeing it while the group is alive keeps gloo's threads from aborting
        # the process at interpreter exit
        gc.collect()
        if self.world > 1:
            self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def save_final(self) -> str:
        out = os.path.join(self.run_dir, "final")
        sd = self.accelerator.get_state_dict(self.student) if self._sharded else None  # collective
        if self.accelerator.is_main_process:
            self.unwrapped.save_pretrained(out, **({"state_dict": sd} if sd is not None else {}))
            self.processor.save_pretrained(out)
        self.accelerator.wait_for_everyone()
        return out

    def log_eval(self, writer=None) -> dict:
        """Evaluation on the main process (the unwrapped student); the other ranks wait."""
        if self.world > 1 and not self._sharded:
            res = self._log_eval(writer) if self.accelerator.is_main_process else {}
            self.accelerator.wait_for_everyone()
            return res
        return self._log_eval(writer)

    def _log_eval(self, writer=None) -> dict:
        from .data import load_dataset_rows as _load

        ec = self.cfg.eval
        rows = _load(self.paths["eval"], self.cfg.data.image_root)
        rows = rows[:ec.limit] if ec.limit else rows
        res = evaluate(self.unwrapped, self.processor, rows, k=ec.k, batch_size=ec.batch_size,
                       max_new_tokens=ec.max_new_tokens, system_prompt=self.cfg.data.system_prompt or None,
                       seed=self.cfg.run.seed)
        res["step"] = self.step
        with open(os.path.join(self.run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        if writer is not None:
            for k, v in res.items():
                if k.startswith("acc@"):
                    writer.add_scalar(f"eval/{k}", v, self.step)
        if self.verbose:
            accs = ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k.startswith("acc@"))
            print(f"eval at step {self.step}: {accs} (n={res['n']})", flush=True)
        return res


class _Null:
    """A do-nothing file for the ranks that do not write metrics."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _text):
        pass

    def flush(self):
        pass


def _rows(weight: torch.Tensor) -> int:
    """Rows of a possibly sharded weight (ZeRO-3 keeps the full shape in ``ds_shape``)."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def config_summary(cfg: TrainConfig) -> dict:
    return to_dict(cfg)


def _to_plain(batch: GRPOBatch) -> dict:
    """A GRPO rollout batch as nested dicts / lists / tensors (loadable with ``weights_only=True``)."""
    return {f.name: getattr(batch, f.name) if f.name != "views" else dataclasses.asdict(batch.views)
            for f in dataclasses.fields(batch)}


def _from_plain(d: dict, device) -> GRPOBatch:
    d = dict(d)
    views = ViewBatch(**d.pop("views")).to(device)
    return GRPOBatch(views=views, **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()})


def _truncate_log(path: str, step: int) -> None:
    """Keep the JSONL lines of steps up to ``step`` (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    _atomic_write(path, "".join(lines))


def check_resume_config(cfg: TrainConfig, saved_path: str) -> None:
    """A resumed run continues with the config it started with: refuse other changes than
    ``RESUME_MAY_CHANGE`` (a longer run, logging, evaluation)."""
    if not os.path.exists(saved_path):
        return
    from .config import load_config

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
