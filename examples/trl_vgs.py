"""VGS on-policy distillation with TRL's DistillationTrainer, configured through TRL's own parser.

Every ``VGSDistillationConfig`` field (TRL's ``DistillationConfig`` and the VGS loss's ``vgs_*`` fields) is a
command-line flag and a key of the YAML given with ``--config``; the arguments are saved with the run
(``training_args.bin`` / ``trainer_state.json``). Real models (local paths; nothing is downloaded):

    accelerate launch --config_file configs/accelerate/ddp.yaml examples/trl_vgs.py \\
        --config examples/trl/qwen3vl-8b-to-2b.yaml \\
        --student /path/to/Qwen3-VL-2B-Instruct --teacher /path/to/Qwen3-VL-8B-Instruct \\
        --data /path/to/vision-sr1-47k/train.jsonl

Offline smoke run on tiny random Qwen3-VL models (CPU, seconds; --tiny makes the batch, accumulation and
completion length small unless you set them):

    python examples/trl_vgs.py --tiny --max-steps 2
"""

from __future__ import annotations

import dataclasses
import os
import sys

# the example runs from a checkout without installing it too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# what --tiny changes unless the command line or the YAML sets it
TINY_DEFAULTS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_completion_length=16,
                     learning_rate=1e-3, activation_checkpointing=False, logging_steps=1, save_strategy="no",
                     report_to=[], seed=0, lr_scheduler_type="constant", weight_decay=0.01)


@dataclasses.dataclass
class ScriptArguments:
    student: str | None = dataclasses.field(default=None, metadata={"help": "student model folder"})
    teacher: str | None = dataclasses.field(default=None, metadata={"help": "teacher model folder"})
    data: str | None = dataclasses.field(default=None, metadata={"help": "JSONL {image, question, answer}"})
    tiny: bool = dataclasses.field(default=False, metadata={"help": "tiny random models, synthetic data, offline"})
    limit: int = dataclasses.field(default=0, metadata={"help": "use at most this many training rows (0: all)"})


def tiny_setup(out_dir: str, n: int):
    """Tiny random Qwen3-VL student/teacher, the offline task tokenizer, and n synthetic rows."""
    from vgs_train.data import synthetic
    from vgs_train.data.examples import load_image, load_jsonl
    from vgs_train.loops.embedded import build_tokenizer
    from vgs_train.models.tiny import TinyModelConfig, build_processor, build_tiny_model

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
    from vgs_train.data.examples import load_dataset_rows, load_image

    rows = load_dataset_rows(path)
    rows = rows[:limit] if limit else rows
    return [(load_image(r.image), r.question) for r in rows]


def to_dataset(rows, system_prompt: str):
    """TRL's conversational format: a ``prompt`` (messages) and an ``image`` column."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "system", "content": system_prompt}, {"role": "user", "content": q}], "image": img}
        for img, q in rows])


def parse(argv=None):
    """(VGSDistillationConfig, ScriptArguments) from the command line and the --config YAML; --tiny fills in
    small defaults where neither set a value."""
    from trl import TrlParser

    from vgs_train.integrations.trl import VGSDistillationConfig

    parser = TrlParser((VGSDistillationConfig, ScriptArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--output_dir" not in argv and "--output-dir" not in argv:
        argv += ["--output_dir", "runs/trl-vgs"]
    if "--tiny" in argv and not any(a.startswith(("--use_cpu", "--use-cpu")) for a in argv):
        import torch

        if not torch.cuda.is_available():  # TRL's config refuses its bf16 default on a machine without a GPU
            argv += ["--use_cpu", "true"] + ([] if any(a.startswith("--bf16") for a in argv) else ["--bf16", "false"])
    args, script = parser.parse_args_and_config(argv)
    if script.tiny:
        given = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        given |= set(_yaml_keys(argv))
        tiny = {k: v for k, v in TINY_DEFAULTS.items() if k not in given}
        if tiny:
            args = dataclasses.replace(args, **tiny)
    return args, script


def _yaml_keys(argv) -> list[str]:
    import yaml

    if "--config" not in argv:
        return []
    with open(argv[argv.index("--config") + 1]) as f:
        return list((yaml.safe_load(f) or {}).keys())


def main(argv=None):
    args, script = parse(argv)

    import torch

    from vgs_train.integrations.trl import VGSDistillationTrainer
    from vgs_train.pipeline.views import REASONING_SYSTEM_PROMPT

    if script.tiny:
        steps = max(args.max_steps, 1)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        n = args.per_device_train_batch_size * args.gradient_accumulation_steps * steps * world
        student, teacher, proc, rows = tiny_setup(args.output_dir, max(n, 8))
    else:
        if not (script.student and script.teacher and script.data):
            raise SystemExit("--student, --teacher and --data are needed (or --tiny)")
        from vgs_train.models.modeling import load_model, load_processor

        proc = load_processor(script.student)
        student = load_model(script.student)
        teacher = load_model(script.teacher, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        rows = load_rows(script.data, script.limit)
    proc.tokenizer.padding_side = "left"
    trainer = VGSDistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=proc,
                                     train_dataset=to_dataset(rows, REASONING_SYSTEM_PROMPT))
    trainer.train()
    trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.accelerator.is_main_process:
        print(f"VGS distillation: {trainer.state.global_step} optimizer steps, loss {losses[-1] if losses else None}, "
              f"loss keywords {trainer.vgs_kwargs}", flush=True)
    return trainer


if __name__ == "__main__":
    trainer = main()
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # every rank ends the process group, so each one exits cleanly
