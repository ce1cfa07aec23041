"""Console scripts: ``vgs-train``, ``vgs-eval``, ``vgs-calibrate`` (gamma, App. A) and ``vgs-analyze``
(gradient angles per VDS decile, Sec. 3.2 / Fig. 3)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads slow everyone down
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# what a CLI reports as ``prog: error: ...`` (exit code 2) instead of a traceback: bad config values and
# YAML syntax (ValueError), missing / unreadable files and model folders (OSError), a missing optional package
USER_ERRORS = (ValueError, OSError, ImportError, yaml.YAMLError)


def report_error(prog: str, e) -> int:
    """Print ``prog: error: e`` and return the exit code 2 (one of ``USER_ERRORS``, not a traceback)."""
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def split_config(config: str | None, overrides) -> tuple[str | None, list[str]]:
    """The first positional is the config file unless it is an override (``key=value``, not ``*.yaml``)."""
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config] + list(overrides)
    return config, list(overrides)


def _is_config_arg(value: str) -> bool:
    """A config file (``*.yaml`` / ``*.yml``) or a ``key=value`` override, not a checkpoint path."""
    if value.startswith("-"):
        return False
    return value.endswith((".yaml", ".yml")) or ("=" in value and not os.path.isdir(value))


def _bare_resume(argv: list[str]) -> list[str]:
    """``--resume`` takes an optional PATH; where the next argument is the config or an override, it is
    not the PATH: ``--resume`` then means the latest checkpoint and the argument stays a positional."""
    out, moved = [], False
    for i, a in enumerate(argv):
        if a == "--":  # the rest is positional
            return out + (["--resume"] if moved else []) + argv[i:]
        if out and out[-1].startswith("--r") and "--resume".startswith(out[-1]) and _is_config_arg(a):
            out.pop()  # re-added, bare, at the end
            moved = True
        out.append(a)
    return out + (["--resume"] if moved else [])


def parse_train_args(argv=None) -> argparse.Namespace:
    """vgs-train's arguments: ``config`` (a YAML path or None), ``overrides``, ``resume`` (False, True = the
    latest checkpoint, or a checkpoint folder) and ``print_config``."""
    p = argparse.ArgumentParser(
        prog="vgs-train", description="On-policy (VGS) distillation of a VLM student from a VLM teacher.",
        epilog="Example: vgs-train configs/tiny.yaml loss.method=opd run.max_steps=20 run.out_dir=runs/opd")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded tiny default)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.alpha=2 optim.lr=1e-5")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue the run in run.out_dir from its latest checkpoint (or from the checkpoint "
                        "folder PATH; a following *.yaml or key=value argument is the config / an override)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_intermixed_args(_bare_resume(list(sys.argv[1:] if argv is None else argv)))
    if isinstance(args.resume, str) and args.resume.endswith((".yaml", ".yml")):  # --resume=CONFIG.yaml
        p.error(f"--resume PATH is a checkpoint folder, got {args.resume!r} (write the config before --resume)")
    args.config, args.overrides = split_config(args.config, args.overrides)
    return args


def train_main(argv=None) -> int:
    args = parse_train_args(argv)
    from .config import load_config, to_dict

    try:
        cfg = load_config(args.config, args.overrides, check_paths=True)
    except USER_ERRORS as e:
        return report_error("vgs-train", e)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
    except USER_ERRORS as e:
        return report_error("vgs-train", e)
    try:
        trainer.train()
    except SystemExit:  # the signal stop: every rank leaves at the same step, after the checkpoint
        trainer.close()
        raise
    trainer.close()
    if trainer.accelerator.is_main_process:
        print(f"done: {trainer.step} steps; run directory {trainer.run_dir}")
    return 0


def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vgs-eval", description="Greedy Acc@1 and sampled Acc@k on JSONL sets.")
    p.add_argument("model", help="a model folder (save_pretrained: model + processor), e.g. RUN/final")
    p.add_argument("data", nargs="+", help="JSONL files {image, question, answer} (or hf:NAME[:SPLIT])")
    p.add_argument("--k", type=int, default=4,
                   help="samples per prompt for Acc@k at T=1.0: 0 = greedy Acc@1 only, else >= 2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, default=0, help="at most this many rows per set")
    p.add_argument("--text-only", action="store_true", help="evaluate the text-only view (image removed)")
    p.add_argument("--image-root", default="",
                   help="relative image paths resolve against this folder (default: each JSONL's folder), "
                        "as data.image_root in training")
    p.add_argument("--system-prompt", default="",
                   help="the system prompt (default: the paper's reasoning prompt), as data.system_prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    from .config import check_eval_k, check_model_path

    try:
        check_eval_k(args.k, "--k")
        for flag, v, lo in (("--batch-size", args.batch_size, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                            ("--limit", args.limit, 0)):
            if v < lo:
                raise ValueError(f"{flag} must be >= {lo}, got {v}")
        check_model_path(args.model, "model")
    except ValueError as e:
        return report_error("vgs-eval", e)
    import torch

    from .data import load_dataset_rows
    from .evaluate import evaluate
    from .modeling import load_model, load_processor

    try:  # every set is read (and checked) before the model loads
        sets = {}
        for spec in args.data:
            rows = load_dataset_rows(spec, args.image_root)
            sets[spec] = rows[:args.limit] if args.limit else rows
        device = "cuda" if torch.cuda.is_available() else "cpu"
        processor = load_processor(args.model)
        model = load_model(args.model).to(device).eval()
    except USER_ERRORS as e:
        return report_error("vgs-eval", e)
    results = {}
    for spec, rows in sets.items():
        results[spec] = evaluate(model, processor, rows, k=args.k, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, with_image=not args.text_only,
                                 system_prompt=args.system_prompt or None, seed=args.seed, device=device)
    keys = ["acc@1"] + ([f"acc@{args.k}"] if args.k else [])
    w = max(len(s) for s in results) + 2
    print(f"{'set':<{w}}{'n':>6}" + "".join(f"{k:>9}" for k in keys))
    for spec, r in results.items():
        print(f"{spec:<{w}}{r['n']:>6}" + "".join(f"{r[k]:>9.3f}" for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def calibrate_main(argv=None) -> int:
    from .calibrate import main

    return main(argv)


def analyze_main(argv=None) -> int:
    from .analyze import main

    return main(argv)
