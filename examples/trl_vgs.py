"""VGS on-policy distillation with TRL's DistillationTrainer (``pip install 'vgs-kernels[trl]'``).

Real models (local paths; nothing is downloaded):

    accelerate launch --config_file configs/accelerate/ddp.yaml examples/trl_vgs.py \\
        --student /path/to/Qwen3-VL-2B-Instruct --teacher /path/to/Qwen3-VL-8B-Instruct \\
        --data /path/to/vision-sr1-47k/train.jsonl --gamma 0.41 --out runs/trl-vgs

Offline smoke run on tiny random Qwen3-VL models (CPU, seconds):

    python examples/trl_vgs.py --tiny --max-steps 2 --out /tmp/trl-vgs
"""

from __future__ import annotations

import argparse
import os


def tiny_setup(out_dir: str, n: int = 8):
    """Tiny random Qwen3-VL student/teacher, the offline task tokenizer, and n synthetic rows."""
    from vgs_train import synthetic
    from vgs_train.data import load_image, load_jsonl
    from vgs_train.embedded import build_tokenizer
    from vgs_train.tiny import TinyModelConfig, build_processor, build_tiny_model

    tok = build_tokenizer("task")
    proc = build_processor(tok, min_pixels=32 * 32, max_pixels=64 * 64)
    student = build_tiny_model(TinyModelConfig(), tok, seed=0)
    teacher = build_tiny_model(TinyModelConfig(hidden_size=96, num_attention_heads=6, intermediate_size=192),
                               tok, seed=1)
    # one folder per rank under torchrun / accelerate launch (the task is the same: it is seeded)
    data = os.path.join(out_dir, "data" + (f"-rank{os.environ['RANK']}" if "RANK" in os.environ else ""))
    synthetic.write_task(data, n, 0, 64, "train")
    rows = load_jsonl(os.path.join(data, "train.jsonl"))
    return student, teacher, proc, [(load_image(r.image), r.question) for r in rows]


def load_rows(path: str, limit: int = 0):
    from vgs_train.data import load_dataset_rows, load_image

    rows = load_dataset_rows(path)
    rows = rows[:limit] if limit else rows
    return [(load_image(r.image), r.question) for r in rows]


def to_dataset(rows, system_prompt: str):
    """TRL's conversational format: a ``prompt`` (messages) and an ``image`` column."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": q}], "image": img}
        for img, q in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student")
    ap.add_argument("--teacher")
    ap.add_argument("--data")
    ap.add_argument("--tiny", action="store_true", help="tiny random models and synthetic data, offline")
    ap.add_argument("--out", default="runs/trl-vgs")
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per device per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--max-completion-length", type=int, default=2048)
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--gamma", type=float, default=1.0, help="0.41 for Qwen3-VL-2B, 0.36 for 4B (App. A)")
    a = ap.parse_args(argv)

    import torch
    from trl import DistillationConfig

    from vgs_train.integrations.trl import VGSDistillationTrainer
    from vgs_train.views import REASONING_SYSTEM_PROMPT

    if a.tiny:
        student, teacher, proc, rows = tiny_setup(a.out)
    else:
        if not (a.student and a.teacher and a.data):
            ap.error("--student, --teacher and --data are needed (or --tiny)")
        from vgs_train.modeling import load_model, load_processor

        bf16 = torch.cuda.is_available()
        proc = load_processor(a.student)
        student = load_model(a.student)
        teacher = load_model(a.teacher, dtype=torch.bfloat16 if bf16 else torch.float32)
        rows = load_rows(a.data, a.limit)
    proc.tokenizer.padding_side = "left"
    args = DistillationConfig(
        output_dir=a.out, max_steps=a.max_steps, num_train_epochs=1, learning_rate=a.lr, weight_decay=0.01,
        lr_scheduler_type="constant", per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, max_completion_length=a.max_completion_length,
        temperature=1.0, top_p=1.0, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=not a.tiny, report_to="none", logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, seed=0)
    trainer = VGSDistillationTrainer(
        model=student, teacher_model=teacher, args=args, processing_class=proc,
        train_dataset=to_dataset(rows, REASONING_SYSTEM_PROMPT),
        vgs_kwargs=dict(mode="vgs", alpha=a.alpha, beta=a.beta, gamma=a.gamma))
    trainer.train()
    return trainer


if __name__ == "__main__":
    trainer = main()
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # every rank ends the process group, so each one exits cleanly
