"""The on-policy distillation loop, nanoGPT-style: read :meth:`Trainer.train`, then :meth:`Trainer.train_step`,
then the micro-step (:class:`vgs_train.loops.distill.DistillStep`, :class:`vgs_train.loops.grpo.GRPOStep` for the GRPO
methods; their common interface: :mod:`vgs_train.loops.distill`).

Per optimizer step, for each of ``optim.grad_accum`` micro-batches (``accelerator.accumulate``: gradients
are reduced and DeepSpeed steps on the last one only; ``accelerator.backward`` divides by the count):

  1. rollouts: the student samples completions for the image-view prompts (``Pipeline.sample``);
  2. views: the completion ids are appended unchanged to the image and the text-only prompts;
  3. four decoder passes give the hidden states at the response positions (``Pipeline.hidden``);
  4. the VGS loss of both lm_heads (``Pipeline.loss``); backward.

Then gradient clipping, AdamW (linear warm-up, then constant), logging, evaluation, checkpoints
(:mod:`vgs_train.loops.checkpoint`). docs/training.md describes the step and the multi-process rules.

Multi-process (``accelerate launch`` / ``torchrun``): every rank draws the same global micro-batch from the
seeded sampler and keeps its share (``rank_share``), samples its own rollouts, and scales its loss by the
all-reduced normaliser so that the engine's gradient average is the single-process gradient on the global
batch; the loss runs inside the wrapped student's forward (the lm_head is whole there under FSDP2 /
ZeRO-3); metrics are reduced over ranks; a stop signal on any rank stops all (``set_trigger`` /
``check_trigger``) after one checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import time

import torch

from ..config import TrainConfig, save_config, steering_mode
from ..data.examples import Sampler, load_dataset_rows
from ..models.modeling import lm_head_rows
from ..pipeline.distributed import (
    configure_deepspeed,
    global_counts,
    prepare_sharded_lm_head,
    rank_share,
    reduce_metrics,
    run_with_lm_head,
)
from ..pipeline.evaluate import evaluate
from ..pipeline.gradients import select_params
from ..pipeline.health import HealthMonitor
from ..pipeline.pipe import Pipeline, load_pair
from ..pipeline.rollout import build_engine
from ..pipeline.views import PromptBuilder
from .calibrate import AutoGamma, summarise
from .checkpoint import Checkpoints, Progress, atomic_write, check_resume_config, truncate_log
from .distill import DistillStep
from .embedded import resolve_paths
from .grpo import GRPOStep

STEP_TIMES = ("time_rollout", "time_forward", "time_loss_backward")


def learning_rate(oc, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over ``optim.warmup_steps``
    (AdamW's first updates are its largest relative to the gradient: a cold start at full rate can wreck a
    small model), then constant (the paper's schedule)."""
    if oc.warmup_steps and step < oc.warmup_steps:
        return oc.lr * (step + 1) / oc.warmup_steps
    return oc.lr


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | bool = False, verbose: bool = True):
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.verbose = verbose and self.accelerator.is_main_process
        self._check_launch()
        set_seed(cfg.run.seed + self.rank)  # rank 0 (and a single process) keeps the run's seed
        with self.accelerator.main_process_first():  # the embedded default is prepared once
            self.paths = resolve_paths(cfg, self.verbose)
        self.run_dir = os.path.abspath(cfg.run.out_dir)
        if resume:  # before any model loads
            check_resume_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.pipe = self._build_pipeline()
        self.rows = load_dataset_rows(self.paths["train"], cfg.data.image_root)
        if cfg.data.max_prompt_length:
            self.rows = self._drop_long_prompts(self.rows, cfg.data.max_prompt_length)
        self.sampler = Sampler(len(self.rows), cfg.run.seed, cfg.data.shuffle)
        self.auto_gamma = AutoGamma(cfg.loss.gamma_calibration_steps) if cfg.loss.gamma == "auto" else None
        gamma_fn = self._gamma if self.auto_gamma is not None else None
        self.micro_step = step_class(cfg)(self.pipe, cfg, scale=self._loss_scale, in_forward=self._in_forward,
                                          gamma_fn=gamma_fn)
        self.health = HealthMonitor(cfg.health, warmup_steps=cfg.optim.warmup_steps,
                                    watch_prior_gap=cfg.uses_visual_target)
        self.progress = Progress()
        self.checkpoints = Checkpoints(self.accelerator, os.path.join(self.run_dir, "checkpoints"),
                                       cfg.run.keep_checkpoints)
        # saved and restored by accelerator.save_state / load_state, in this order
        state = [self.progress, self.sampler, self.health]
        state += self.micro_step.checkpoint_state()
        state += [self.auto_gamma] if self.auto_gamma is not None else []
        self.accelerator.register_for_checkpointing(*state)
        self._stop_signal = None
        if resume:
            self.load_checkpoint(resume if isinstance(resume, str) else self.checkpoints.latest())
        elif self.checkpoints.exists():
            raise FileExistsError(f"{self.run_dir} already has checkpoints: pass --resume to continue it, or "
                                  "choose another run.out_dir")

    # ------------------------------------------------------------------ the loop
    def train(self, on_step=None) -> list[dict]:
        """Run to ``run.max_steps``; returns the per-step metrics. ``on_step(metrics, warnings)``, when given,
        is called after every step with the health warnings raised at it (the caller shows them then)."""
        cfg, main = self.cfg, self.accelerator.is_main_process
        self._start_run()
        history = []
        with self._stop_on_signals(), self._progress_bar() as bar, self._metrics_file() as metrics_file:
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
                self._log(m, metrics_file, bar)
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.log_eval()
                self._stop_if_signalled()
                if cfg.run.save_every and self.step % cfg.run.save_every == 0:
                    self.save_checkpoint()
        self.save_checkpoint()
        self.save_final()
        if cfg.eval.at_end and self.paths.get("eval"):
            self.log_eval()
        return history

    def train_step(self) -> dict:
        """One optimizer step over ``optim.grad_accum`` micro-batches; returns the step's metrics."""
        t0 = time.perf_counter()
        oc, acc = self.cfg.optim, self.accelerator
        reuse = self.micro_step.begin(oc.grad_accum)  # GRPO: the stored rollouts of the iteration cycle
        parts = []
        for index in range(oc.grad_accum):
            with acc.accumulate(self.student):  # no gradient sync / DeepSpeed step before the last micro-batch
                loss, m = self.micro_step(index, None if reuse else self._next_rows())
                t = time.perf_counter()
                acc.backward(loss)  # divided by grad_accum (DeepSpeed divides by its own, equal, count)
                m["time_loss_backward"] = m.pop("time_loss", 0.0) + time.perf_counter() - t
            parts.append(m)
        self.micro_step.end()
        grad_norm = acc.clip_grad_norm_(self.student.parameters(), oc.grad_clip) if oc.grad_clip > 0 else None
        for group in self.optimizer.param_groups:  # a function of the step alone: resume needs no scheduler state
            group["lr"] = learning_rate(oc, self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._step_metrics(parts, grad_norm, t0)

    def _next_rows(self) -> list:
        """This rank's share of the next global micro-batch (every rank draws the same indices)."""
        n = self.cfg.optim.batch_size * self.world
        return [self.rows[i] for i in rank_share(self.sampler.next(n), self.rank, self.world)]

    def _step_metrics(self, parts: list[dict], grad_norm, t0: float) -> dict:
        m = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0] if k != "tokens"}
        for k in STEP_TIMES:
            m[k] = sum(p[k] for p in parts)
        m["tokens"] = sum(p["tokens"] for p in parts)
        if self.world > 1:  # token-weighted means of the VGS metrics; the loss is the mean of scaled losses
            m = reduce_metrics(m, weight=m["tokens"], sum_keys=("tokens",),
                               mean_keys=("loss", "gamma", "response_len", "rollout_acc", "truncated", *STEP_TIMES),
                               sum_over_ranks=self._sum_over_ranks)
        m["step_time"] = time.perf_counter() - t0
        m["tokens_per_s"] = m["tokens"] / max(m["step_time"], 1e-9)
        m["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)  # DeepSpeed: None at times
        m["lr"] = self.optimizer.param_groups[0]["lr"]
        m["step"] = self.step
        return m

    # ------------------------------------------------------------------ multi-process pieces of the step
    def _loss_scale(self, mask: torch.Tensor) -> float:
        """This rank's loss factor: the engines average gradients over ranks, the loss normalises by global
        counts (1.0 in one process)."""
        return global_counts(mask).scale(self.cfg.loss.reduction)

    def _in_forward(self, fn):
        """``fn()`` inside the wrapped student's and its lm_head's forward where an engine needs it (DDP
        prepares its reducer there; FSDP2 / ZeRO-3 hold the whole lm_head weight there)."""
        if self.world > 1 or self._sharded:
            return run_with_lm_head(self.student, self.unwrapped, fn)
        return fn()

    def _sum_over_ranks(self, values) -> torch.Tensor:
        from accelerate.utils import reduce

        t = torch.as_tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return reduce(t, reduction="sum").cpu()

    # ------------------------------------------------------------------ gamma: auto
    def _gamma(self, hidden, mask) -> float:
        """gamma for this micro-batch: measured (Eq. 15) while ``loss.gamma: auto`` calibrates, then frozen."""
        ag = self.auto_gamma
        if not ag.calibrating:
            return ag.value
        if not hasattr(self, "_gamma_params"):
            self._gamma_params = select_params(self.unwrapped)
        g = ag.measure(self.pipe.loss, hidden, mask, self._gamma_params, mode=steering_mode(self.cfg.loss_mode),
                       alpha=self.cfg.loss.alpha)
        if not ag.calibrating:
            self._gamma_frozen()
        return g

    def _gamma_frozen(self) -> None:
        ag = self.auto_gamma
        info = {"gamma": ag.frozen, "steps": ag.steps, "summary": summarise(ag.history), "history": ag.history,
                "alpha": self.cfg.loss.alpha, "frozen_at_step": self.step + 1}
        if self.accelerator.is_main_process:
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_write(os.path.join(self.run_dir, "gamma.json"), json.dumps(info, indent=2))
        if self.verbose:
            sm = info["summary"]["gamma"]
            print(f"\ngamma: auto -> {ag.frozen:.4f} (mean over {ag.steps} calibration micro-batches, std "
                  f"{sm['std']:.4f}); frozen from now on", flush=True)

    # ------------------------------------------------------------------ logging, signals, evaluation
    def _start_run(self) -> None:
        if self.accelerator.is_main_process:
            os.makedirs(self.checkpoints.dir, exist_ok=True)
            save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))
            atomic_write(os.path.join(self.run_dir, "paths.json"), json.dumps(self.paths, indent=2))
        if self.cfg.run.tensorboard:  # a resumed run drops the events logged after its checkpoint
            purge = {"purge_step": self.step + 1} if self.step else {}
            self.accelerator.init_trackers("tb", init_kwargs={"tensorboard": purge})
        self.accelerator.wait_for_everyone()

    def _metrics_file(self):
        if not self.accelerator.is_main_process:
            return contextlib.nullcontext()
        return open(os.path.join(self.run_dir, "metrics.jsonl"), "a")

    @contextlib.contextmanager
    def _progress_bar(self):
        if not (self.cfg.run.progress and self.accelerator.is_main_process):
            yield None
            return
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.run.max_steps, initial=self.step, desc=self.cfg.loss.method, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    def _log(self, m: dict, metrics_file, bar) -> None:
        if self.step % self.cfg.run.log_every == 0 or self.step == self.cfg.run.max_steps:
            if metrics_file is not None:
                metrics_file.write(json.dumps(m) + "\n")
                metrics_file.flush()
            self.accelerator.log({f"train/{k}": v for k, v in m.items() if k != "step"}, step=self.step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{m[k]:.3f}" for k in ("loss", "std", "vis", "reward", "gamma") if k in m}
                            | {"acc": f"{m['rollout_acc']:.2f}"})

    @contextlib.contextmanager
    def _stop_on_signals(self):
        def handler(signum, _frame):
            self._stop_signal = signum
            signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_if_signalled(self) -> None:
        """A signal that reached any rank stops all of them at this step, after one checkpoint."""
        if self._stop_signal is not None:
            self.accelerator.set_trigger()
        if self.accelerator.check_trigger():  # a collective: every rank asks at every step
            sig = self._stop_signal or signal.SIGTERM
            path = self.save_checkpoint()
            if self.accelerator.is_main_process:
                print(f"\nsignal {sig}: checkpoint written to {path}; exiting", flush=True)
            raise SystemExit(128 + sig)

    def log_eval(self) -> dict:
        """Evaluation on the main process (the unwrapped student); the other ranks wait."""
        if self.world > 1 and not self._sharded:
            res = self._log_eval() if self.accelerator.is_main_process else {}
            self.accelerator.wait_for_everyone()
            return res
        return self._log_eval()

    def _log_eval(self) -> dict:
        ec = self.cfg.eval
        rows = load_dataset_rows(self.paths["eval"], self.cfg.data.image_root)
        rows = rows[:ec.limit] if ec.limit else rows
        res = evaluate(self.unwrapped, self.processor, rows, k=ec.k, batch_size=ec.batch_size,
                       max_new_tokens=ec.max_new_tokens, system_prompt=self.cfg.data.system_prompt or None,
                       seed=self.cfg.run.seed)
        res["step"] = self.step
        with open(os.path.join(self.run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        self.accelerator.log({f"eval/{k}": v for k, v in res.items() if k.startswith("acc@")}, step=self.step)
        if self.verbose:
            accs = ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k.startswith("acc@"))
            print(f"eval at step {self.step}: {accs} (n={res['n']})", flush=True)
        return res

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        """Model, optimizer, every rank's RNG streams, the registered state (``vgs_train.loops.checkpoint``)."""
        return self.checkpoints.save(self.step, self.micro_step.rank_files())

    def load_checkpoint(self, path: str) -> None:
        self.checkpoints.load(path)
        self.checkpoints.saved_step = self.step
        self.micro_step.restore_rank_files(self.checkpoints, path, self.accelerator.device)
        if self.accelerator.is_main_process:  # lines logged after this checkpoint are logged again
            for log in ("metrics.jsonl", "eval.jsonl"):
                truncate_log(os.path.join(self.run_dir, log), self.step)
        if self.verbose:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save_final(self) -> str:
        out = os.path.join(self.run_dir, "final")
        sd = self.accelerator.get_state_dict(self.student) if self._sharded else None  # collective
        if self.accelerator.is_main_process:
            self.unwrapped.save_pretrained(out, **({"state_dict": sd} if sd is not None else {}))
            self.processor.save_pretrained(out)
        self.accelerator.wait_for_everyone()
        return out

    def close(self) -> None:
        """End the run's process group (and trackers) once every rank got here. Call it on success (or on the
        signal stop, which all ranks take at the same step) only: a rank that failed would leave the others
        waiting."""
        # FSDP2 / DDP state is cyclic; freeing it while the group is alive keeps gloo's threads from aborting
        # the process at interpreter exit
        gc.collect()
        if self.world > 1:
            self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    # ------------------------------------------------------------------ set-up
    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.student)

    @property
    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def _check_launch(self) -> None:
        cfg = self.cfg
        if not step_class(cfg).shardable and self._sharded:
            raise ValueError(f"loss.method={cfg.loss.method} runs with DDP or one process; FSDP / DeepSpeed shard "
                             "the lm_head that GRPO's log-probabilities read outside the model's forward")
        if self.world > 1 and cfg.loss.gamma == "auto":
            raise ValueError("loss.gamma=auto calibrates on one process; with several processes measure gamma "
                             "with vgs-calibrate and pass the number (or a preset)")

    def _build_pipeline(self) -> Pipeline:
        """Models (the student prepared with AdamW; the teacher replicated, never prepared: inference only,
        no optimizer state, in bf16 under mixed precision) and the pipeline over them."""
        cfg, acc = self.cfg, self.accelerator
        teacher_dtype = torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float32
        self.processor, student, teacher, self.vocab_size = load_pair(
            self.paths["student"], self.paths["teacher"], attn_implementation=cfg.model.attn_implementation,
            teacher_dtype=teacher_dtype)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if cfg.model.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        student.train()
        teacher.eval().requires_grad_(False)
        oc = cfg.optim
        opt = torch.optim.AdamW(student.parameters(), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                weight_decay=oc.weight_decay)
        configure_deepspeed(acc, oc.batch_size * cfg.rollout.samples_per_prompt, oc.grad_accum)
        self.student, self.optimizer = acc.prepare(student, opt)
        prepare_sharded_lm_head(self.student)  # ZeRO-3: the lm_head weight is gathered for the root's forward
        self.teacher = teacher.to(acc.device)
        builder = PromptBuilder(self.processor, cfg.data.system_prompt or None)
        engine = build_engine(cfg.rollout, self.tokenizer, lm_head_rows(self.student))
        return Pipeline(self.student, self.teacher, builder, engine, self.vocab_size, cfg.loss_kwargs(),
                        device=acc.device, autocast=acc.autocast, paths=self.paths)

    def _drop_long_prompts(self, rows: list, limit: int) -> list:
        lengths = self.pipe.builder.prompt_lengths(rows)
        kept = [r for r, n in zip(rows, lengths) if n <= limit]
        if not kept:
            raise ValueError(f"data.max_prompt_length={limit}: every training prompt is longer "
                             f"(shortest {min(lengths)} tokens)")
        if self.verbose and len(kept) < len(rows):
            print(f"data.max_prompt_length={limit}: dropped {len(rows) - len(kept)} of {len(rows)} training rows "
                  f"(longest prompt {max(lengths)} tokens)", flush=True)
        return kept


def step_class(cfg: TrainConfig):
    """The micro-step of ``loss.method``: GRPO's or distillation's."""
    return GRPOStep if cfg.is_grpo else DistillStep


def make_accelerator(cfg: TrainConfig):
    """The run's ``Accelerator``: bf16 autocast on GPU (``model.dtype: auto``), gradient accumulation over
    ``optim.grad_accum`` micro-batches, TensorBoard under ``run.out_dir/tb`` when ``run.tensorboard``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    mp = "bf16" if (cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and cuda)) else "no"
    run_dir = os.path.abspath(cfg.run.out_dir)
    return Accelerator(mixed_precision=mp, cpu=not cuda, gradient_accumulation_steps=cfg.optim.grad_accum,
                       log_with="tensorboard" if cfg.run.tensorboard else None,
                       project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir))
