"""Console scripts: ``vgs-train``, ``vgs-eval``, ``vgs-calibrate`` (gamma, App. A) and ``vgs-analyze``
(gradient angles per VDS decile, Sec. 3.2 / Fig. 3). The top layer of ``vgs_train``: argument parsing and
error reporting over the loops and tools (docs/design.md)."""

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
    from .loops.trainer import Trainer

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

    from .data.examples import load_dataset_rows
    from .models.modeling import load_model, load_processor
    from .pipeline.evaluate import evaluate

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


def _tool_setup(prog: str, args):
    """The shared start of ``vgs-calibrate`` and ``vgs-analyze``: config (+ overrides), seed, the pipeline
    (models in fp32, eval mode; loss keywords of the steering mode with gamma 1: the tools measure
    unnormalised gradients), the prompt rows of ``args.split`` and the parameters selected by ``args.params``.

    Returns (config_path, cfg, pipe, rows, params), or None after printing the error (exit code 2)."""
    import torch

    from .config import load_config, steering_mode
    from .data.examples import load_dataset_rows
    from .loops.embedded import resolve_paths
    from .pipeline.gradients import select_params
    from .pipeline.pipe import Pipeline

    config, overrides = split_config(args.config, args.overrides)
    # bad values and YAML syntax (ValueError), missing files / model folders (OSError): `prog: error: ...`
    try:
        cfg = load_config(config, overrides, check_paths=True)
        torch.manual_seed(cfg.run.seed)
        pipe = Pipeline.from_config(cfg, resolve_paths(cfg, verbose=not args.quiet),
                                    loss_kwargs=cfg.loss_kwargs(mode=steering_mode(cfg.loss_mode), gamma=1.0))
        rows = load_dataset_rows(pipe.paths[args.split] or pipe.paths["train"], cfg.data.image_root)
        params = select_params(pipe.student, args.params or None)
    except USER_ERRORS as e:
        report_error(prog, e)
        return None
    return config, cfg, pipe, rows, params


def calibrate_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="vgs-calibrate",
        description="Measure gamma = ||g_std|| / ||g_std + alpha*g_vis|| (paper Eq. 15, App. A) on on-policy "
                    "rollouts of the training data and write it into a config.",
        epilog="Example: vgs-calibrate configs/tiny.yaml loss.alpha=2 --batches 8 --write runs/gamma.yaml")
    p.add_argument("config", nargs="?", help="training YAML config (default: the embedded tiny default)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--batches", type=int, default=8, help="rollout batches to measure (N)")
    p.add_argument("--batch-size", type=int, default=0, help="prompts per batch (default: optim.batch_size)")
    p.add_argument("--params", default="", help="regex over parameter names (default: all trainable)")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="which data to sample prompts from")
    p.add_argument("--write", default="", help="write a YAML config with loss.gamma set (a copy of CONFIG)")
    p.add_argument("--json", default="", help="write per-step values and the summary as JSON")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.batches < 1:
        return report_error("vgs-calibrate", "--batches must be >= 1")
    setup = _tool_setup("vgs-calibrate", args)
    if setup is None:
        return 2
    from .config import GAMMA_PRESETS
    from .loops.calibrate import calibrate, write_gamma

    config, cfg, pipe, rows, params = setup
    mode, alpha = pipe.loss_kwargs["mode"], cfg.loss.alpha
    if not args.quiet:
        print(f"{'step':>4}{'tokens':>8}{'||g_std||':>12}{'||g_vis||':>12}{'cos(phi)':>10}{'gamma':>9}", flush=True)

    def show(st):
        if not args.quiet:
            print(f"{st['step']:>4}{st['tokens']:>8}{st['norm_std']:>12.4g}{st['norm_vis']:>12.4g}"
                  f"{st['cos_phi']:>10.4f}{st['gamma']:>9.4f}", flush=True)

    res = calibrate(pipe, rows, batches=args.batches, batch_size=args.batch_size or cfg.optim.batch_size,
                    mode=mode, alpha=alpha, params=params, samples_per_prompt=cfg.rollout.samples_per_prompt,
                    seed=cfg.run.seed, progress=show)
    sm = res["summary"]
    res.update(student=pipe.paths["student"], teacher=pipe.paths["teacher"], param_pattern=args.params or None)
    print(f"gamma = {sm['gamma']['mean']:.4f} +- {sm['gamma']['std']:.4f} over {args.batches} batches "
          f"(alpha={alpha}, mode={res['mode']}); ||g_std|| {sm['norm_std']['mean']:.4g} +- "
          f"{sm['norm_std']['std']:.2g}, ||g_vis|| {sm['norm_vis']['mean']:.4g} +- {sm['norm_vis']['std']:.2g}, "
          f"cos(phi) {sm['cos_phi']['mean']:.4f} +- {sm['cos_phi']['std']:.4f}; paper presets at alpha=2: "
          + ", ".join(f"{k} {v}" for k, v in GAMMA_PRESETS.items()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.write:
        write_gamma(res["gamma"], args.write, config, alpha)
        print(f"wrote loss.gamma={res['gamma']:.4f} to {args.write}")
    return 0


def analyze_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="vgs-analyze",
        description="Angles between the std, vis and lang parameter gradients per VDS decile of on-policy "
                    "tokens (paper Sec. 3.2, Fig. 3); writes CSV, PNG and JSON.",
        epilog="Example: vgs-analyze configs/tiny.yaml --out runs/analyze --batches 4 --params 'language_model'")
    p.add_argument("config", nargs="?", help="training YAML config (default: the embedded tiny default)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (model.student=PATH, ...)")
    p.add_argument("--out", default="runs/analyze", help="output folder")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (one rollout each)")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--params", default="", help="regex over parameter names (default: all trainable)")
    p.add_argument("--vjp-batch", type=int, default=30,
                   help="parameter gradients per vectorised backward pass (lower = less memory; 1 = a loop)")
    p.add_argument("--split", choices=("eval", "train"), default="eval", help="prompts from (default: eval)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", metavar="ANGLES_JSON", help="only print the table of a finished run's angles.json")
    p.add_argument("--readme", metavar="PATH", help="write the angle table into this README (between "
                   "<!-- analyze:start --> and <!-- analyze:end -->)")
    args = p.parse_args(argv)
    from .tools.analyze import PAIRS, analyze, format_table, plot, readme_section, trend, write_csv
    from .tools.readme import write_section

    if args.report:
        with open(args.report) as f:
            summary = json.load(f)
        print(format_table(summary["table"]))
        if args.readme:
            write_section(args.readme, "analyze", readme_section(summary))
        return 0
    setup = _tool_setup("vgs-analyze", args)
    if setup is None:
        return 2
    _, cfg, pipe, rows, params = setup
    table = analyze(pipe, rows, batches=args.batches, batch_size=args.batch_size, bins=args.bins, params=params,
                    seed=cfg.run.seed, vjp_batch=max(1, args.vjp_batch))
    os.makedirs(args.out, exist_ok=True)
    csv_path = write_csv(table, os.path.join(args.out, "angles.csv"))
    n_params = sum(p.numel() for _, p in params)
    student, teacher = pipe.paths["student"], pipe.paths["teacher"]
    png = plot(table, os.path.join(args.out, "angles.png"),
               f"{os.path.basename(student.rstrip('/'))} vs {os.path.basename(teacher.rstrip('/'))}"
               f": {sum(r['tokens'] for r in table)} on-policy tokens, {n_params:,} parameters")
    summary = {"table": table, "trend": {f"angle_{a}_{b}": trend(table, f"angle_{a}_{b}") for a, b in PAIRS},
               "student": student, "teacher": teacher, "params": n_params, "param_pattern": args.params or None,
               "batches": args.batches, "batch_size": args.batch_size, "out": os.path.relpath(args.out)}
    with open(os.path.join(args.out, "angles.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(format_table(table))
    t = summary["trend"]["angle_lang_vis"]
    print(f"angle(g_lang, g_vis): bin 0 {t['first']:.1f} deg -> bin {len(table) - 1} {t['last']:.1f} deg, slope "
          f"{t['slope_deg_per_bin']:+.2f} deg/bin, Spearman {t['spearman']:+.2f}")
    print(f"wrote {csv_path}, {png}, {os.path.join(args.out, 'angles.json')}")
    if args.readme:
        write_section(args.readme, "analyze", readme_section(summary))
    return 0
