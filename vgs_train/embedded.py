"""The embedded default: a synthetic visually grounded task, an offline Qwen tokenizer and tiny
Qwen3-VL teacher/student, prepared once (teacher SFT, student warm-up) and cached on disk. Everything
is saved with ``save_pretrained`` and the trainer loads it by path like any HF model."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time

import torch

from . import synthetic
from .config import TrainConfig, to_dict
from .data import Sampler, load_jsonl
from .rng import fork_rng
from .views import REASONING_SYSTEM_PROMPT, PromptBuilder, append_completion, response_hidden

PREP_VERSION = 3


def build_tokenizer(vocab: str):
    from .tokenizer import build_qwen_tokenizer

    if vocab == "full":
        return build_qwen_tokenizer("full")
    texts = synthetic.corpus() + [REASONING_SYSTEM_PROMPT, "system\nuser\nassistant\n", "\n\n"]
    return build_qwen_tokenizer("task", texts)


def encode_targets(tokenizer, texts: list[str]):
    """Reference responses + <|im_end|>, right-padded: (ids [B, T], mask [B, T])."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return ids, mask


def sft(model, processor, examples, *, steps: int, lr: float, batch_size: int, seed: int,
        log_every: int = 50, desc: str = "sft") -> list[float]:
    """Supervised warm-up on the reference responses (image view), cross-entropy on response tokens,
    AdamW with linear warm-up and cosine decay. Returns the loss per step."""
    builder = PromptBuilder(processor)
    tok = builder.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    sampler = Sampler(len(examples), seed)
    model.train()
    losses = []
    t0 = time.time()
    with fork_rng():
        torch.manual_seed(seed)
        for step in range(steps):
            rows = [examples[i] for i in sampler.next(batch_size)]
            enc = builder.encode(rows, with_image=True)
            ids, mask = encode_targets(tok, [r.response for r in rows])
            inputs = append_completion(enc, ids, mask)
            h = response_hidden(model, inputs, ids.shape[1])
            logits = model.get_output_embeddings()(h[mask]).float()
            loss = torch.nn.functional.cross_entropy(logits, ids[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                print(f"  [{desc}] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return losses


def prep_key(cfg: TrainConfig) -> str:
    e = to_dict(cfg.embedded)
    e.pop("cache_dir", None)
    blob = json.dumps({"v": PREP_VERSION, "embedded": e}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_embedded(cfg: TrainConfig, verbose: bool = True) -> dict:
    """Build (or reuse from the cache) the synthetic task, the SFT'd tiny teacher and the warmed-up tiny
    student. Returns paths: {"root", "train", "eval", "teacher", "student", "info"}."""
    from .tiny import build_processor, build_tiny_model

    e = cfg.embedded
    root = os.path.join(cfg.cache_dir(), f"embedded-{prep_key(cfg)}")
    paths = {"root": root, "train": os.path.join(root, "data", "train.jsonl"),
             "eval": os.path.join(root, "data", "eval.jsonl"), "teacher": os.path.join(root, "teacher"),
             "student": os.path.join(root, "student"), "info": os.path.join(root, "prep.json")}
    if os.path.exists(paths["info"]):
        if verbose:
            print(f"embedded default: reusing cached teacher/student/data in {root}", flush=True)
        return paths
    os.makedirs(cfg.cache_dir(), exist_ok=True)
    tmp = root + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    if verbose:
        print(f"embedded default: preparing task, teacher and student in {root}", flush=True)
    synthetic.write_task(os.path.join(tmp, "data"), e.n_train, e.task_seed, e.image_size, "train")
    synthetic.write_task(os.path.join(tmp, "data"), e.n_eval, e.task_seed + 1, e.image_size, "eval")
    tok = build_tokenizer(e.tokenizer_vocab)
    proc = build_processor(tok, min_pixels=32 * 32, max_pixels=max(e.image_size, 32) ** 2)
    train = load_jsonl(os.path.join(tmp, "data", "train.jsonl"))
    info = {"tokenizer_ids": len(tok), "time_s": {}}
    for name, tiny, steps, lr, seed in (("teacher", e.teacher, e.teacher_sft_steps, e.teacher_sft_lr, e.sft_seed),
                                        ("student", e.student, e.student_sft_steps, e.student_sft_lr,
                                         e.sft_seed + 1)):
        t1 = time.time()
        model = build_tiny_model(tiny, tok, seed=seed)
        losses = sft(model, proc, train, steps=steps, lr=lr, batch_size=e.sft_batch_size, seed=seed,
                     log_every=max(steps // 4, 1) if verbose else 0, desc=f"{name} sft")
        model.save_pretrained(os.path.join(tmp, name))
        proc.save_pretrained(os.path.join(tmp, name))
        info[f"{name}_sft_losses"] = losses
        info[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        info["time_s"][name] = time.time() - t1
    with open(os.path.join(tmp, "prep.json"), "w") as f:
        json.dump(info, f)
    if os.path.exists(root):  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)
    if verbose:
        print(f"embedded default: prepared in {time.time() - t0:.0f}s", flush=True)
    return paths
