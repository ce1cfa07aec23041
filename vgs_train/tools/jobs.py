"""Distillation runs of the embedded default as jobs, for the demo and the study.

Each job trains in a worker process of one thread (the numbers do not depend on the machine's core count or
on how many workers run), under one instruction-set setting (``vgs_train.machine``: the workers' environment
is set before they start, and each checks the code path it got), and writes its result as JSON when it
finishes: an interrupted study reruns only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads slow everyone down
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # jobs train on the CPU: no accelerator probe (and its warning)

import torch  # noqa: E402

THREADS = 1  # per process: fixed, so the core count does not change the numbers
HISTORY_KEYS = ("loss", "std", "vis", "lang", "prior_gap", "rollout_acc", "truncated")
JOB_VERSION = 1  # part of each cached result's key: bump when a job measures something else


@dataclass(frozen=True)
class Arm:
    """One method and its settings (None: the base config's value)."""

    method: str  # a loss.method: opd | vgs | ...
    alpha: float | None = None
    beta: float | None = None
    lr: float | None = None
    detach_target_prior: bool = True

    def overrides(self) -> list[str]:
        o = [f"loss.method={self.method}"]
        o += [] if self.alpha is None else [f"loss.alpha={self.alpha}"]
        o += [] if self.beta is None else [f"loss.beta={self.beta}"]
        o += [] if self.lr is None else [f"optim.lr={self.lr}"]
        o += [] if self.detach_target_prior else ["loss.detach_target_prior=false"]
        return o

    def _given(self) -> list[tuple[str, float]]:
        return [(k, v) for k, v in (("alpha", self.alpha), ("beta", self.beta), ("lr", self.lr)) if v is not None]

    @property
    def name(self) -> str:
        parts = [self.method] + [f"{k}{v:g}" for k, v in self._given()]
        return "-".join(parts + ([] if self.detach_target_prior else ["prior-grad"]))

    @property
    def label(self) -> str:
        parts = [f"{k} {v:g}" for k, v in self._given()]
        parts += [] if self.detach_target_prior else ["gradient into z_sp"]
        return self.method.upper() + (f" ({', '.join(parts)})" if parts else "")


def run_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps({"v": JOB_VERSION, **payload}, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the jobs (in a worker)
def _enter_worker(job: dict) -> dict:
    """One thread, quiet transformers, and the instruction-set setting the job asked for (checked)."""
    from .. import machine

    torch.set_num_threads(THREADS)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    info = machine.describe()
    want = machine.ISA_SETTINGS[job["setting"]]
    if any(os.environ.get(k) != v for k, v in want.items()) or (
            "ATEN_CPU_CAPABILITY" in want and info["cpu_capability"].lower() != want["ATEN_CPU_CAPABILITY"]):
        raise RuntimeError(f"job {job['name']}: asked for the {job['setting']!r} instruction-set setting, runs with "
                           f"ATen's {info['cpu_capability']} and {info['isa_env']}")
    return info


def train_run(job: dict) -> dict:
    """Distil one student: train with ``job["overrides"]``, then assess it on ``job["eval_rows"]`` held-out rows.
    Returns the assessment, the per-step history and where it ran."""
    info = _enter_worker(job)
    from ..config import load_config
    from ..loops.trainer import Trainer
    from ..pipeline.health import SIGNALS
    from .assess import assess

    cfg = load_config(None, job["overrides"])
    queue = job.get("queue")
    shutil.rmtree(cfg.run.out_dir, ignore_errors=True)  # a run that was interrupted starts again
    trainer = Trainer(cfg, verbose=False)

    def on_step(m, warnings):
        if queue is not None:
            queue.put([f"{job['name']} step {m['step']}: {w}" for w in warnings])

    t0 = time.time()
    history = trainer.train(on_step=on_step)
    train_s = time.time() - t0
    student = trainer.unwrapped.eval()
    trainer.close()
    proc, teacher, rows = _assessment_inputs(trainer.paths, job["eval_rows"])
    res = assess(student, teacher, proc, rows, cfg.loss_kwargs(), cfg.rollout.max_new_tokens)
    return {"name": job["name"], **job["meta"], **res,
            "flags_ever": {k: any(m[f"health_{k}"] for m in history) for k in SIGNALS},
            "train_s": train_s, "machine": info,
            "history": [{"step": m["step"], **{k: m.get(k, float("nan")) for k in HISTORY_KEYS}} for m in history]}


def reference_run(job: dict) -> dict:
    """The teacher (with and without the image) and the initial student, assessed on the held-out rows."""
    info = _enter_worker(job)
    from ..config import load_config
    from ..loops.embedded import resolve_paths
    from ..models.modeling import load_model
    from .assess import assess

    cfg = load_config(None, job["overrides"])
    paths = resolve_paths(cfg, verbose=False)
    proc, teacher, rows = _assessment_inputs(paths, job["eval_rows"])
    student = load_model(paths["student"]).eval()
    lk, mnt = cfg.loss_kwargs(), cfg.rollout.max_new_tokens
    return {"teacher": assess(teacher, teacher, proc, rows, lk, mnt, gap=False, text_only=False),
            "teacher_text": assess(teacher, teacher, proc, rows, lk, mnt, with_image=False, gap=False),
            "initial": assess(student, teacher, proc, rows, lk, mnt),
            "initial_text": assess(student, teacher, proc, rows, lk, mnt, with_image=False, gap=False),
            "machine": info}


def _assessment_inputs(paths: dict, eval_rows: int):
    """(the student's processor, the teacher in eval mode, the first ``eval_rows`` held-out rows) of a run."""
    from ..data.examples import load_jsonl
    from ..models.modeling import load_model, load_processor

    return (load_processor(paths["student"]), load_model(paths["teacher"]).eval(),
            load_jsonl(paths["eval"])[:eval_rows])


def _run(job: dict) -> dict:
    return {"train": train_run, "reference": reference_run}[job["kind"]](job)


# ---------------------------------------------------------------------------- running jobs (the parent)
def load_result(path: str, key: str) -> dict | None:
    """The cached result at ``path`` when it was computed for ``key``."""
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    return res if res.get("key") == key else None


def _save_result(path: str, res: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def _environment(env: dict):
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def run_jobs(jobs: list[dict], workers: int, *, setting: str = "default", desc: str = "distilling") -> list[dict]:
    """Run ``jobs`` under the instruction-set ``setting`` on ``workers`` processes (1 and the default setting:
    inline) with one progress bar over their training steps; results in the order of ``jobs``.

    A job: {"kind": "train" | "reference", "name", "overrides", "eval_rows", "meta" (copied into a train
    result), "steps" (for the bar), optional "result_path" + "key": a result already there for that key is
    reused, a new one is written there as soon as it is ready}."""
    from tqdm.auto import tqdm

    from ..machine import isa_environment

    jobs = [{**j, "setting": setting} for j in jobs]
    results: list = [None] * len(jobs)
    pending = []
    for i, j in enumerate(jobs):
        cached = load_result(j["result_path"], j["key"]) if j.get("result_path") else None
        if cached is not None:
            results[i] = cached
        else:
            pending.append(i)
    if not pending:
        return results
    import sys

    bar = tqdm(total=sum(jobs[i].get("steps", 0) for i in pending), desc=f"{desc} ({setting})", unit="step",
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file: a line a 30 s

    def done(i, res):
        if jobs[i].get("result_path"):
            res = {**res, "key": jobs[i]["key"]}
            _save_result(jobs[i]["result_path"], res)
        results[i] = res

    try:
        if workers <= 1 and setting == "default":
            class Inline:
                def put(self, warnings):
                    _show_step(bar, warnings)

            for i in pending:
                done(i, _run({**jobs[i], "queue": Inline()}))
            return results
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        manager = ctx.Manager()
        queue = manager.Queue()
        pool = ProcessPoolExecutor(max(1, workers), mp_context=ctx)
        try:
            # a worker's environment is the parent's when it starts (at submit): set it around the submits only
            with _environment(isa_environment(setting)):
                futures = {pool.submit(_run, {**jobs[i], "queue": queue}): i for i in pending}
            remaining = set(futures)
            while remaining:
                _drain(queue, bar, timeout=0.5)
                for f in [f for f in remaining if f.done()]:
                    remaining.discard(f)
                    done(futures[f], f.result())
            _drain(queue, bar, timeout=0)
        finally:
            pool.shutdown(cancel_futures=True)
            manager.shutdown()
        return results
    finally:
        bar.close()


def _drain(queue, bar, timeout: float) -> None:
    import queue as queue_mod

    try:
        while True:
            _show_step(bar, queue.get(timeout=timeout))
            timeout = 0
    except queue_mod.Empty:
        pass
    except (EOFError, OSError):  # the manager went away (interrupted)
        pass


def _show_step(bar, warnings: list[str]) -> None:
    """One finished training step of some run: advance the bar, print the run's new health warnings."""
    bar.update(1)
    for w in warnings:
        bar.write(w)
