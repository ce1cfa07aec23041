"""Shared tiny settings for the vgs_train tests (offline, CPU, seconds)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = [
    "embedded.n_train=24", "embedded.n_eval=6", "embedded.teacher_sft_steps=2", "embedded.student_sft_steps=2",
    "embedded.sft_batch_size=4", "rollout.max_new_tokens=8", "optim.batch_size=2", "optim.lr=1e-3",
    "run.progress=false", "run.tensorboard=false", "run.save_every=0", "eval.at_end=false", "eval.k=0",
]


def tiny_overrides(cache_dir, out_dir=None, *extra):
    o = TINY + [f"embedded.cache_dir={cache_dir}"]
    if out_dir is not None:
        o.append(f"run.out_dir={out_dir}")
    return o + list(extra)
