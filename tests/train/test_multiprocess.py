"""vgs-train with 2 processes (torchrun, CPU/gloo, DDP): one step equals the single-process step on the
same global batch, and a 2-process run resumes exactly from a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# greedy rollouts (top_k=1) so that 1 and 2 processes sample the same completions; a large Adam eps so that
# the first update is ~linear in the gradient (with eps=1e-8, Adam's g/(|g|+eps) turns fp32 summation-order
# noise on near-zero gradients into visible parameter differences); token reduction, so that each rank's
# loss is rescaled by n_valid_local * world / n_valid_global (ranks hold different token counts); two
# micro-batches per step (DDP reduces the gradients on the last one only)
EXTRA = ["rollout.top_k=1", "optim.grad_accum=2", "run.keep_checkpoints=10", "run.log_every=1", "optim.eps=1e-2",
         "loss.reduction=token"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, overrides: list[str], *flags: str, timeout: int = 120) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if nproc == 1:
        cmd = [sys.executable, "-m", "vgs_train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "vgs_train"]
    cmd += [os.path.join(ROOT, "configs", "tiny.yaml"), *overrides, *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _params(run_dir, step: int) -> dict:
    """A checkpoint's parameters by name (without the "module." prefix of the DDP wrapper's state dict)."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(run_dir, "checkpoints", f"step_{step:07d}", "model.safetensors"))
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _close_params(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"largest parameter difference {worst:.3g} > {atol}"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="no torch.distributed gloo backend")
def test_two_process_step_equals_single_process_and_resumes(tmp_path, embedded_cache):
    cache = embedded_cache  # the session's prepared embedded default
    single, multi, killed = tmp_path / "single", tmp_path / "multi", tmp_path / "killed"
    # one process, 4 prompts per micro-batch, one step
    _run(1, tiny_overrides(cache, single, *EXTRA, "optim.batch_size=4", "run.max_steps=1"))
    # two processes x 2 prompts = the same global batch; N steps, a checkpoint after each
    n = 6
    _run(2, tiny_overrides(cache, multi, *EXTRA, "optim.batch_size=2", f"run.max_steps={n}", "run.save_every=1"))

    s1, ref = _metrics(single)[0], _metrics(multi)
    m1 = ref[0]
    assert m1["tokens"] == s1["tokens"]  # summed over ranks = the global batch
    for k in ("loss", "std", "vis", "lang", "vds", "gate_fraction", "threshold", "rollout_acc", "grad_norm"):
        assert m1[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), (k, m1[k], s1[k])
    _close_params(_params(multi, 1), _params(single, 1), atol=1e-8)
    moved = max(float((_params(multi, 2)[k] - _params(multi, 1)[k]).abs().max()) for k in _params(multi, 1))
    assert moved > 1e-5  # the tolerance above is far below one step's update

    # kill-and-resume: SIGTERM to rank 1 only of a longer 2-process run after its first step; both ranks
    # stop together (checkpoint, exit 143), and the resumed run reproduces the uninterrupted steps
    k = _run_and_kill(tiny_overrides(cache, killed, *EXTRA, "optim.batch_size=2", "run.max_steps=50"))
    if k >= n:
        pytest.skip(f"the signal landed after step {k}: too late to compare with the {n}-step run")
    _run(2, tiny_overrides(cache, killed, *EXTRA, "optim.batch_size=2", f"run.max_steps={k + 1}",
                           "run.save_every=1"), "--resume")
    got, want = _metrics(killed)[-1], ref[k]
    assert [m["step"] for m in _metrics(killed)] == list(range(1, k + 2))
    for key in ("loss", "std", "vis", "lang", "tokens", "threshold"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (key, got[key], want[key])
    _close_params(_params(killed, k + 1), _params(multi, k + 1), atol=1e-7)


def _children(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def _run_and_kill(overrides: list[str], timeout: float = 120) -> int:
    """Start a 2-process run, SIGTERM rank 1 once step 1 is logged; returns the step it stopped at."""
    if not os.path.exists(f"/proc/{os.getpid()}/task"):
        pytest.skip("needs Linux /proc to find the worker processes")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run_dir = [o.split("=", 1)[1] for o in overrides if o.startswith("run.out_dir=")][0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), "-m", "vgs_train", os.path.join(ROOT, "configs", "tiny.yaml"), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        while not (os.path.exists(metrics) and open(metrics).read().strip()):
            assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-4000:]}"
            assert time.time() - t0 < timeout, "no step logged in time"
            time.sleep(0.1)
        rank1 = [c for c in _children(proc.pid) if _rank_of(c) == 1]
        assert len(rank1) == 1, "could not find the rank-1 worker"
        os.kill(rank1[0], signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "the run should stop on the signal"
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        step = int(f.read().strip().split("_")[1])
    assert step >= 1 and "checkpoint written" in out, out[-4000:]
    return step
