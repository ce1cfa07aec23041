"""Console scripts: ``vgs-train``, ``vgs-eval``, ``vgs-calibrate`` (gamma, App. A) and ``vgs-analyze``
(gradient angles per VDS decile, Sec. 3.2 / Fig. 3)."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads slow everyone down
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def train_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="vgs-train", description="On-policy (VGS) distillation of a VLM student from a VLM teacher.",
        epilog="Example: vgs-train configs/tiny.yaml loss.method=opd run.max_steps=20 run.out_dir=runs/opd")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded tiny default)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. loss.alpha=2 optim.lr=1e-5")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the run in run.out_dir from its latest checkpoint (or from PATH)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    from .config import load_config, to_dict

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    try:
        cfg = load_config(config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"vgs-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"vgs-train: error: {e}", file=sys.stderr)
        return 2
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
    p.add_argument("--k", type=int, default=4, help="samples per prompt for Acc@k at T=1.0 (0 = greedy only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--limit", type=int, default=0, help="at most this many rows per set")
    p.add_argument("--text-only", action="store_true", help="evaluate the text-only view (image removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    import torch

    from .data import load_dataset_rows
    from .evaluate import evaluate
    from .modeling import load_model, load_processor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = load_processor(args.model)
    model = load_model(args.model).to(device).eval()
    results = {}
    for spec in args.data:
        rows = load_dataset_rows(spec)
        rows = rows[:args.limit] if args.limit else rows
        results[spec] = evaluate(model, processor, rows, k=args.k, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, with_image=not args.text_only,
                                 seed=args.seed, device=device)
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
