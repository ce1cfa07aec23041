"""``make study``: the comparison the README states, on enough seeds to say how sure it is, on two code paths.

Runs OPD, VGS at alpha = 0.5 and at the paper's alpha = 2, and the paper's stabilisers for alpha = 2 (a larger
beta, the gradient into the target's prior, a lower learning rate at the same number of steps), each on
``--seeds`` seeds from the same shipped student, under the machine's own instruction set and under emulated
AVX2 (``vgs_train.machine``). Each run's result is cached (``--out``): a rerun only adds what is missing.
Writes ``study.json`` (committed as docs/results/study.json) with, per setting and arm, the mean acc@1 with
its 95 % confidence interval, the paired difference to OPD per seed with its interval, the own-phrasing
share, collapse and no-gain counts, and the conclusions both settings support; the README's comparison
is generated from it.

    python -m vgs_train.tools.study [--seeds 8] [--settings default,avx2] [--arms NAME,...] [--workers 2]
    python -m vgs_train.tools.study --report docs/results/study.json [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from .jobs import Arm, run_jobs, run_key
from .readme import format_rows, markdown, report
from .stats import covers_zero, mean_ci, paired_diff, prediction_interval

STEPS = 300
EVAL_ROWS = 200
BASE_OVERRIDES = [
    f"run.max_steps={STEPS}", "optim.lr=1e-3", "optim.warmup_steps=20", "optim.batch_size=16",
    "optim.grad_clip=1.0", "rollout.max_new_tokens=24", "run.save_every=0", "run.log_every=1", "run.progress=false",
    "run.tensorboard=false",
    "health.window=25",  # 16 prompts a step: a shorter window's rollout accuracy is too noisy to warn on
    "eval.at_end=false", "eval.k=0",
]
OPD = Arm("opd")
VGS_PAPER = Arm("vgs", alpha=2.0)
VGS_LOW = Arm("vgs", alpha=0.5)
DEMO_ARMS = (OPD, VGS_PAPER, VGS_LOW)
# the paper's levers against alpha = 2 diverging (Fig. 4, App. B.3): the language-preservation weight beta,
# the gradient into the target's prior, and a smaller step at the same budget (with its OPD pair)
STABILISERS = (Arm("vgs", alpha=2.0, beta=0.1), Arm("vgs", alpha=2.0, beta=1.0),
               Arm("vgs", alpha=2.0, detach_target_prior=False), Arm("vgs", alpha=2.0, lr=3e-4), Arm("opd", lr=3e-4))
STUDY_ARMS = DEMO_ARMS + STABILISERS
SETTINGS = ("default", "avx2")


# ---------------------------------------------------------------------------- jobs
def arm_config(arm: Arm, extra: list[str] = ()):
    from ..config import load_config

    return load_config(None, BASE_OVERRIDES + arm.overrides() + list(extra))


def prepared_identity(extra: list[str]) -> str:
    """What the runs start from: the shipped models' hashes, or the local cache's keys."""
    from ..loops.embedded import read_manifest, shipped_paths, stage_keys

    cfg = arm_config(OPD, extra)
    if shipped_paths(cfg):
        return run_key(read_manifest()["files"])
    return run_key(stage_keys(cfg))


def reference_job(setting: str, extra: list[str], eval_rows: int, identity: str, result_dir: str | None) -> dict:
    """The teacher and the initial student assessed under ``setting`` (cached in ``result_dir`` when given)."""
    overrides = BASE_OVERRIDES + list(extra)
    job = {"kind": "reference", "name": "reference", "overrides": overrides, "eval_rows": eval_rows, "steps": 0}
    if result_dir:
        job.update(result_path=os.path.join(result_dir, "reference.json"), key=run_key(
            {"overrides": overrides, "eval_rows": eval_rows, "setting": setting, "prepared": identity}))
    return job


def train_job(run_root: str, setting: str, arm: Arm, seed: int, extra: list[str], eval_rows: int, identity: str,
              steps: int = STEPS, cache: bool = True) -> dict:
    """One run of ``arm`` on ``seed`` in ``run_root/NAME`` (its result cached there with ``cache``)."""
    name = f"{arm.name}-seed{seed}"
    run_extra = [f"run.max_steps={steps}"] + list(extra)
    overrides = BASE_OVERRIDES + arm.overrides() + [f"run.seed={seed}"] + run_extra
    cfg = arm_config(arm, run_extra)
    meta = {"arm": arm.name, "label": arm.label, "method": arm.method, "alpha": arm.alpha,
            "beta": cfg.loss.beta, "lr": cfg.optim.lr, "detach_target_prior": arm.detach_target_prior,
            "seed": seed, "setting": setting}
    job = {"kind": "train", "name": name, "meta": meta, "eval_rows": eval_rows, "steps": steps,
           "overrides": overrides + [f"run.out_dir={os.path.join(run_root, name)}"]}
    if cache:
        job.update(result_path=os.path.join(run_root, name, "result.json"), key=run_key(
            {"overrides": overrides, "eval_rows": eval_rows, "setting": setting, "prepared": identity}))
    return job


# ---------------------------------------------------------------------------- aggregation
SHARE = (0.0, 1.0)  # the range of an accuracy or a share: its intervals are clipped to it
DIFF = (-1.0, 1.0)  # the range of a difference of two


def arm_summary(runs: list[dict], opd_runs: list[dict], reference: dict, window: int) -> dict:
    """Per-arm statistics over seeds (``runs`` of one arm and setting; ``opd_runs`` its OPD pairs by seed)."""
    from .assess import outcome

    init, teacher = reference["initial"], reference["teacher"]
    flags = [outcome(r, init, window) for r in runs]
    acc = mean_ci([r["acc"] for r in runs], SHARE)
    diff = paired_diff({r["seed"]: r["acc"] for r in runs}, {r["seed"]: r["acc"] for r in opd_runs}, DIFF)
    own = mean_ci([r["own_phrasing_share"] for r in runs], SHARE)
    own_diff = paired_diff({r["seed"]: r["own_phrasing_share"] for r in runs},
                           {r["seed"]: r["own_phrasing_share"] for r in opd_runs}, DIFF)
    first = runs[0]
    gap = teacher["acc"] - init["acc"]
    return {
        "arm": first["arm"], "label": first["label"], "setting": first["setting"], "method": first["method"],
        "alpha": first["alpha"], "beta": first["beta"], "lr": first["lr"],
        "detach_target_prior": first["detach_target_prior"], "n_seeds": len(runs),
        "paired_with": opd_runs[0]["label"],
        "seeds": sorted(r["seed"] for r in runs),
        "acc_mean": acc["mean"], "acc_ci95": acc["ci95"], "acc_sd": acc["sd"],
        "acc_pred95": prediction_interval([r["acc"] for r in runs], SHARE),
        "gap_closed": (acc["mean"] - init["acc"]) / gap if gap > 0 else math.nan,
        "diff_vs_opd_mean": diff["mean"], "diff_vs_opd_ci95": diff["ci95"],
        "own_phrasing_share_mean": own["mean"], "own_phrasing_share_ci95": own["ci95"],
        "own_phrasing_diff_vs_opd_mean": own_diff["mean"], "own_phrasing_diff_vs_opd_ci95": own_diff["ci95"],
        **{f"{k}_mean": mean_ci([r[k] for r in runs])["mean"] for k in ("acc_sampled", "acc_text", "degenerate")},
        **{f"{k}_ci95": mean_ci([r[k] for r in runs], SHARE)["ci95"] for k in ("acc_sampled", "acc_text")},
        "acc_by_type_mean": {t: mean_ci([r["acc_by_type"][t] for r in runs])["mean"] for t in first["acc_by_type"]},
        "collapsed": sum(f["collapsed"] for f in flags), "no_gain": sum(f["no_gain"] for f in flags),
        "per_seed": [{"seed": r["seed"], "acc": r["acc"], "own_phrasing_share": r["own_phrasing_share"], **f}
                     for r, f in sorted(zip(runs, flags), key=lambda x: x[0]["seed"])],
    }


def aggregate(results: dict, references: dict, arms: list[Arm], window: int) -> dict:
    """``results[setting][arm name]``: the runs; ``references[setting]``: the reference result."""
    out_arms = []
    for setting, by_arm in results.items():
        for arm in arms:
            runs = by_arm.get(arm.name)
            if not runs:
                continue
            opd_name = Arm("opd", lr=arm.lr).name if arm.method == "vgs" else OPD.name
            opd = by_arm.get(opd_name) or by_arm[OPD.name]
            out_arms.append(arm_summary(runs, opd, references[setting], window))
    return {"arms": out_arms, "machine_vs_seed": machine_spread(results),
            "references": {s: {k: _slim(ref[k]) for k in REFERENCE_KEYS} | {"machine": ref["machine"]}
                           for s, ref in references.items()}}


REFERENCE_KEYS = ("teacher", "teacher_text", "initial", "initial_text")


def _slim(a: dict) -> dict:
    return {k: v for k, v in a.items() if k != "sample"}


def machine_spread(results: dict) -> dict:
    """Per arm, how far one seed's acc@1 moves between the two settings against how far it moves between
    seeds: sd over seeds of (default - avx2) / sqrt(2) (one run's deviation from a change of code path) and the
    seeds' sd within a setting (pooled)."""
    if set(results) != set(SETTINGS):
        return {}
    out = {}
    for name in results["default"]:
        a = {r["seed"]: r["acc"] for r in results["default"][name]}
        b = {r["seed"]: r["acc"] for r in results["avx2"].get(name, [])}
        if len(set(a) & set(b)) < 2:
            continue
        d = paired_diff(a, b)
        sds = [mean_ci(list(x.values()))["sd"] for x in (a, b)]
        out[name] = {"machine_sd": d["sd"] / math.sqrt(2), "seed_sd": math.sqrt(sum(s * s for s in sds) / 2),
                     "seeds": d["keys"], "mean_abs_change": sum(abs(a[k] - b[k]) for k in d["keys"]) / len(d["keys"])}
    return out


# ---------------------------------------------------------------------------- conclusions
def _fmt_ci(m: float, ci: list[float], pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(m)} [{f(ci[0])}, {f(ci[1])}]"


def _setting_name(s: str) -> str:
    return {"default": "the machine's own instruction set", "avx2": "emulated AVX2"}.get(s, s)


def conclusions(study: dict) -> list[str]:
    """The sentences the README may state: a difference only where its 95 % interval excludes 0 in the same
    direction under every setting the study ran; otherwise "no difference shown"."""
    by = {}
    for a in study["arms"]:
        by.setdefault(a["arm"], {})[a["setting"]] = a
    settings = sorted({a["setting"] for a in study["arms"]}, key=lambda s: SETTINGS.index(s) if s in SETTINGS else 9)
    lines = []

    def per_setting(arm, mean_key, ci_key, pct=True):
        return "; ".join(f"{_fmt_ci(by[arm][s][mean_key], by[arm][s][ci_key], pct)} ({_setting_name(s)})"
                         for s in settings if s in by[arm])

    def direction(arm, mean_key, ci_key):
        signs = {(by[arm][s][mean_key] > 0) for s in settings if s in by[arm]}
        decided = all(not covers_zero(by[arm][s][ci_key]) for s in settings if s in by[arm])
        return (signs.pop() if decided and len(signs) == 1 else None), len([s for s in settings if s in by[arm]])

    for name, arms in by.items():
        any_arm = next(iter(arms.values()))
        if any_arm["method"] == "opd":
            continue
        d, n_settings = direction(name, "diff_vs_opd_mean", "diff_vs_opd_ci95")
        label, opd = any_arm["label"], any_arm["paired_with"]
        diff = per_setting(name, "diff_vs_opd_mean", "diff_vs_opd_ci95")
        if d is None:
            lines.append(f"{label}: acc@1 not shown to differ from {opd} (difference in points, 95 % CI: {diff}).")
        else:
            lines.append(f"{label}: acc@1 {'higher' if d else 'lower'} than {opd} under "
                         f"{'both settings' if n_settings > 1 else 'this setting'} (difference in points, 95 % CI: "
                         f"{diff}).")
        d, _ = direction(name, "own_phrasing_diff_vs_opd_mean", "own_phrasing_diff_vs_opd_ci95")
        own = per_setting(name, "own_phrasing_share_mean", "own_phrasing_share_ci95", pct=False)
        rel = ("not shown to differ from OPD's" if d is None else ("higher than OPD's" if d else "lower than OPD's"))
        lines.append(f"{label}: share of greedy answers in the student's own words {own}; {rel}.")
        coll = ", ".join(f"{arms[s]['collapsed']}/{arms[s]['n_seeds']} ({_setting_name(s)})" for s in settings
                         if s in arms)
        if any(arms[s]["collapsed"] for s in arms):
            lines.append(f"{label}: collapsed runs {coll}.")
    for name, arms in by.items():
        a = next(iter(arms.values()))
        if a["method"] == "opd":
            own = per_setting(name, "own_phrasing_share_mean", "own_phrasing_share_ci95", pct=False)
            lines.append(f"{a['label']}: share of greedy answers in the student's own words {own}.")
    return lines


# ---------------------------------------------------------------------------- tables and README
def table_rows(study: dict) -> list[list[str]]:
    rows = [["arm", "setting", "seeds", "acc@1 [95 % CI]", "vs OPD, points [95 % CI]", "gap closed",
             "sampled acc", "text-only acc", "acc colour / shape", "own phrasing share", "collapsed", "no gain"]]
    for a in study["arms"]:
        vs = "-" if a["method"] == "opd" and a["diff_vs_opd_mean"] == 0 else _fmt_ci(
            a["diff_vs_opd_mean"], a["diff_vs_opd_ci95"], pct=True)
        bt = a["acc_by_type_mean"]
        rows.append([a["label"], a["setting"], str(a["n_seeds"]), _fmt_ci(a["acc_mean"], a["acc_ci95"]), vs,
                     f"{100 * a['gap_closed']:.0f} %", f"{a['acc_sampled_mean']:.3f}", f"{a['acc_text_mean']:.3f}",
                     f"{bt['colour']:.2f} / {bt['shape']:.2f}", _fmt_ci(a["own_phrasing_share_mean"],
                                                                        a["own_phrasing_share_ci95"]),
                     f"{a['collapsed']}/{a['n_seeds']}", f"{a['no_gain']}/{a['n_seeds']}"])
    return rows


def reference_line(study: dict) -> str:
    parts = []
    for s, ref in study["references"].items():
        parts.append(f"{_setting_name(s)}: teacher {ref['teacher']['acc']:.3f} (text-only "
                     f"{ref['teacher_text']['acc']:.3f}), initial student {ref['initial']['acc']:.3f} (text-only "
                     f"{ref['initial_text']['acc']:.3f})")
    return "; ".join(parts)


def readme_section(study: dict) -> str:
    st = study["settings"]
    spread = study["machine_vs_seed"]
    lines = [
        f"_Generated by `python -m vgs_train.tools.study --report {st['json']} --readme README.md` from `make study` "
        f"({study['machine']['cpu']}, {st['seeds']} seeds per arm and setting, {study['runs_s'] / 3600:.1f} h of "
        "single-threaded runs); do not edit by hand._",
        "",
        f"{st['steps']} steps per run, {st['eval_rows']} held-out questions; acc@1 greedy; sampled acc the mean "
        "accuracy of 4 samples at T = 1; own phrasing share the share of greedy answers that reason in the "
        "student's words. Same prepared models under both settings: " + reference_line(study) + ".",
        "",
        *markdown(table_rows(study)),
        "",
        "What the study supports (a difference is stated only where its 95 % interval excludes 0 under both "
        "settings):",
        "",
        *[f"* {c}" for c in study["conclusions"]],
    ]
    ratio = [v["machine_sd"] / v["seed_sd"] for v in spread.values() if v["seed_sd"] > 0]
    if ratio:
        lines += ["", f"Machine against seed: changing only the instruction set moves one run's acc@1 by "
                      f"{mean_ci([v['mean_abs_change'] for v in spread.values()])['mean']:.3f} on average; its spread is "
                      f"{min(ratio):.1f}-{max(ratio):.1f} x the seed-to-seed spread across the arms "
                      "(docs/demo.md)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgs_train.tools.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="run folders and cached results")
    p.add_argument("--seeds", type=int, default=8, help="seeds per arm and setting (0, 1, ...)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="instruction-set settings, comma-separated")
    p.add_argument("--arms", default="", help="arm names, comma-separated (default: all: "
                   + ", ".join(a.name for a in STUDY_ARMS) + ")")
    p.add_argument("--steps", type=int, default=STEPS, help="distillation steps per run")
    p.add_argument("--eval-rows", type=int, default=EVAL_ROWS, help="held-out prompts to evaluate on")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="training processes")
    p.add_argument("--json", default="docs/results/study.json", help="where to write study.json")
    p.add_argument("--report", metavar="STUDY_JSON", help="only print (and --readme) a finished study")
    p.add_argument("--readme", metavar="PATH", help="write the README's study section")
    p.add_argument("overrides", nargs="*", help="extra config overrides (key=value), e.g. embedded.* for tests")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report, lambda st: format_rows(table_rows(st)), "study", readme_section, args.readme)
    for name in ("seeds", "steps", "eval_rows", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from ..machine import ISA_SETTINGS, describe

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in ISA_SETTINGS]
    if bad or not settings:
        p.error(f"--settings: unknown {bad}; valid: {', '.join(ISA_SETTINGS)}")
    names = {a.name: a for a in STUDY_ARMS}
    wanted = [s.strip() for s in args.arms.split(",") if s.strip()] or list(names)
    if [w for w in wanted if w not in names]:
        p.error(f"--arms: unknown {[w for w in wanted if w not in names]}; valid: {', '.join(names)}")
    arms = [names[w] for w in wanted]
    if OPD not in arms:
        arms.insert(0, OPD)  # every difference is paired with OPD
    try:
        arm_config(OPD, args.overrides)
    except ValueError as e:
        p.error(str(e))
    out = os.path.abspath(args.out)
    identity = prepared_identity(args.overrides)
    t0 = time.time()
    results, references = {}, {}
    n_runs = len(arms) * args.seeds * len(settings)
    print(f"study: {len(arms)} arms x {args.seeds} seeds x {len(settings)} settings = {n_runs} runs of {args.steps} "
          f"steps on {args.workers} worker(s) (about {n_runs * args.steps * 0.33 / args.workers / 60:.0f} min on "
          f"2 cores when nothing is cached); results cached in {out}", flush=True)
    for setting in settings:
        root = os.path.join(out, setting)
        jobs = [reference_job(setting, args.overrides, args.eval_rows, identity, root)]
        jobs += [train_job(root, setting, arm, seed, args.overrides, args.eval_rows, identity, args.steps)
                 for arm in arms for seed in range(args.seeds)]
        done = run_jobs(jobs, args.workers, setting=setting, desc="study")
        references[setting] = done[0]
        results[setting] = {}
        for r in done[1:]:
            results[setting].setdefault(r["arm"], []).append(r)
    window = arm_config(OPD, args.overrides).health.window
    study = aggregate(results, references, arms, window)
    study["conclusions"] = conclusions(study)
    study.update(settings={"steps": args.steps, "seeds": args.seeds, "eval_rows": args.eval_rows,
                           "settings": settings, "overrides": BASE_OVERRIDES + list(args.overrides),
                           "json": os.path.relpath(args.json)},
                 machine=describe(), runs_s=sum(r["train_s"] for s in results.values() for rs in s.values()
                                                 for r in rs),
                 python=sys.version.split()[0], elapsed_s=time.time() - t0)
    from ..loops.embedded import versions

    study["versions"] = versions()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(study, f, indent=1)
        f.write("\n")
    print("\n" + format_rows(table_rows(study)) + "\n")
    print("\n".join(f"* {c}" for c in study["conclusions"]))
    print(f"\nwrote {args.json}")
    if args.readme:
        from .readme import write_section

        write_section(args.readme, "study", readme_section(study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
