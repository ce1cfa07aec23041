"""``make demo``: OPD against VGS on the embedded default, on a CPU, in minutes.

1. the synthetic task, and the teacher and student shipped with the package (the same models on every
   machine; other ``embedded`` settings prepare them locally, ``vgs_train.embedded``);
2. evaluate the teacher (with and without the image) and the initial student;
3. distil the same student start with OPD, with VGS at the paper's alpha = 2 and at alpha = 0.5, each on two
   seeds (worker processes of one thread each: the numbers do not depend on the core count);
4. assess every run (greedy, per question type, text-only and sampled accuracy, the share of answers in the
   student's own words, divergences to the teacher, collapse, no gain); print the table beside the study's
   intervals (``vgs_train.study``, docs/results/study.json) with a line per arm saying whether this machine's
   runs fall inside them; write ``results.json``, ``table.txt`` and ``curves.png`` into ``--out``.

    python -m vgs_train.demo [--out runs/demo] [--steps N] [--seeds N] [--alphas 2,0.5] [key=value ...]
    python -m vgs_train.demo --report runs/demo/results.json [--readme README.md]   # table / README only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from .jobs import THREADS, Arm, run_jobs
from .study import BASE_OVERRIDES, EVAL_ROWS, OPD, STEPS, VGS_LOW, VGS_PAPER

DEMO_SEEDS = 2
STUDY_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results",
                          "study.json")
MEAN_KEYS = ("acc", "acc_sampled", "acc_text", "own_phrasing_share", "own_phrasing_pref", "std", "vis", "lang",
             "prior_gap", "truncated", "degenerate")


# ---------------------------------------------------------------------------- results
def summarise(runs: list[dict]) -> list[dict]:
    """Mean over seeds per arm, with the collapse and no-gain counts."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in groups.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in MEAN_KEYS}
        out.append({"arm": arm, "label": rs[0]["label"], "method": rs[0]["method"], "alpha": rs[0]["alpha"],
                    "seeds": len(rs), **mean, "collapsed": sum(r["collapsed"] for r in rs),
                    "no_gain": sum(r["no_gain"] for r in rs)})
    return out


def against_study(res: dict, study: dict | None) -> list[dict]:
    """Per arm of this demo: the study's intervals under the default setting and whether each of this
    machine's runs lies inside the study's 95 % prediction interval for one run."""
    if not study:
        return []
    arms = {a["arm"]: a for a in study["arms"] if a["setting"] == "default"}
    out = []
    for m in res["means"]:
        a = arms.get(m["arm"])
        if a is None:
            continue
        runs = [r for r in res["runs"] if r["arm"] == m["arm"]]
        lo, hi = a["acc_pred95"]
        out.append({"arm": m["arm"], "label": m["label"], "study_acc_mean": a["acc_mean"],
                    "study_acc_ci95": a["acc_ci95"], "study_acc_pred95": a["acc_pred95"],
                    "study_n_seeds": a["n_seeds"],
                    "inside": [bool(lo <= r["acc"] <= hi) for r in runs], "runs": [r["acc"] for r in runs]})
    return out


def _f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_rows(res: dict) -> list[list[str]]:
    """The demo table as rows of cells (header first)."""
    rows = [["model", "seed", "acc@1", "colour / shape", "sampled acc", "text-only acc", "own phrasing",
             "std KL", "vis KL", "lang KL", "prior gap", "collapsed", "no gain"]]
    t, tt, s, st = res["teacher"], res["teacher_text"], res["initial"], res["initial_text"]

    def by_type(r):
        return f"{r['acc_by_type']['colour']:.2f} / {r['acc_by_type']['shape']:.2f}"

    rows.append(["teacher", "-", _f(t["acc"]), by_type(t), _f(t["acc_sampled"]), _f(tt["acc"]),
                 _f(t["own_phrasing_share"]), "-", "-", "-", "-", "-", "-"])
    rows.append(["initial student", "-", _f(s["acc"]), by_type(s), _f(s["acc_sampled"]), _f(st["acc"]),
                 _f(s["own_phrasing_share"]), _f(s["std"]), _f(s["vis"]), _f(s["lang"]), _f(s["prior_gap"]),
                 "-", "-"])
    for mean in res["means"]:
        for r in (r for r in res["runs"] if r["arm"] == mean["arm"]):
            rows.append([r["label"], str(r["seed"]), _f(r["acc"]), by_type(r), _f(r["acc_sampled"]),
                         _f(r["acc_text"]), _f(r["own_phrasing_share"]), _f(r["std"]), _f(r["vis"]), _f(r["lang"]),
                         _f(r["prior_gap"]), "yes" if r["collapsed"] else "no", "yes" if r["no_gain"] else "no"])
        rows.append([f"{mean['label']} mean", f"{mean['seeds']} seeds", _f(mean["acc"]), "", _f(mean["acc_sampled"]),
                     _f(mean["acc_text"]), _f(mean["own_phrasing_share"]), _f(mean["std"]), _f(mean["vis"]),
                     _f(mean["lang"]), _f(mean["prior_gap"]), f"{mean['collapsed']}/{mean['seeds']}",
                     f"{mean['no_gain']}/{mean['seeds']}"])
    return rows


def study_rows(res: dict) -> list[list[str]]:
    rows = [["model", "this machine: acc@1 per seed", "study: mean [95 % CI]", "study: one run, 95 %",
             "runs inside"]]
    for c in res["against_study"]:
        lo, hi = c["study_acc_pred95"]
        rows.append([c["label"], " / ".join(_f(a) for a in c["runs"]),
                     f"{_f(c['study_acc_mean'])} [{_f(c['study_acc_ci95'][0])}, {_f(c['study_acc_ci95'][1])}] "
                     f"({c['study_n_seeds']} seeds)", f"[{_f(lo)}, {_f(hi)}]", f"{sum(c['inside'])}/{len(c['inside'])}"])
    return rows


def format_table(res: dict) -> str:
    from .study import format_rows

    text = format_rows(table_rows(res))
    if res.get("against_study"):
        text += "\n\nAgainst the study (docs/results/study.json, the machine's own instruction set):\n"
        text += format_rows(study_rows(res))
    return text


def readme_section(res: dict) -> str:
    """The README's demo section (between the demo markers), generated from ``results.json``."""
    from .study import markdown

    st = res["settings"]
    lines = [
        f"_Generated by `python -m vgs_train.demo --report {st['out']}/results.json --readme README.md` from a "
        f"cold-cache `make demo` run ({res['machine']['cpu']}, {res['machine']['cpu_capability']}, "
        f"{res['wall_s']:.0f} s wall; torch {res['versions']['torch']}, transformers "
        f"{res['versions']['transformers']}); do not edit by hand._",
        "",
        f"{st['steps']} distillation steps per run, {st['batch_size']} prompts per step, lr {st['lr']:g} "
        f"(warm-up {st['warmup_steps']} steps), seeds {', '.join(str(s) for s in st['seeds'])}; evaluated on "
        f"{st['eval_rows']} held-out prompts.",
        "",
        *markdown(table_rows(res)),
    ]
    if res.get("against_study"):
        lines += ["", "The same runs against the study's intervals (machine's own instruction set):", "",
                  *markdown(study_rows(res))]
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: str) -> None:
    """Every run's training curves (moving averages over 10 steps; one colour per arm, one line per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("std", "std KL(p||q)"), ("vis", "vis KL(p||r)"), ("lang", "lang KL(p'||q')"),
            ("prior_gap", "prior gap (low-VDS lang KL)"), ("rollout_acc", "rollout accuracy"),
            ("truncated", "truncated responses")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    colours = {}
    styles = ["-", "--", ":", "-."]
    for ax, (k, title) in zip(axes.flat, keys):
        for r in runs:
            colour = colours.setdefault(r["label"], f"C{len(colours)}")
            xs = [m["step"] for m in r["history"]]
            ys = [m[k] for m in r["history"]]
            sm = [_mean(ys[max(0, j - 9):j + 1]) for j in range(len(ys))]
            ax.plot(xs, sm, color=colour, linestyle=styles[r["seed"] % len(styles)],
                    label=f"{r['label']}, seed {r['seed']}")
        ax.set_title(title)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def load_study(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgs_train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (runs, table, curves, results.json)")
    p.add_argument("--steps", type=int, default=STEPS, help="distillation steps per run")
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help="seeds per method (0, 1, ...)")
    p.add_argument("--alphas", default=f"{VGS_PAPER.alpha:g},{VGS_LOW.alpha:g}",
                   help="comma-separated VGS alphas (default: the paper's and the one recommended here)")
    p.add_argument("--eval-rows", type=int, default=EVAL_ROWS, help="held-out prompts to evaluate on")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="training processes in parallel (one thread each; the numbers do not depend on it)")
    p.add_argument("--study", default=STUDY_JSON, help="the study's results to compare with (skipped if absent)")
    p.add_argument("--report", metavar="RESULTS_JSON", help="only print the table of a finished demo")
    p.add_argument("--readme", metavar="PATH", help="write the demo section of this README (between "
                   "<!-- demo:start --> and <!-- demo:end -->)")
    p.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            res = json.load(f)
        print(format_table(res))
        if args.readme:
            from .readme import write_section

            write_section(args.readme, "demo", readme_section(res))
        return 0
    for name in ("steps", "seeds", "eval_rows", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        p.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if any(not a > 0 for a in alphas):
        p.error(f"--alphas must be > 0, got {args.alphas!r}")
    from .config import load_config
    from .embedded import prepare_embedded, versions
    from .machine import describe
    from .study import arm_config, reference_job, train_job

    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    extra = [f"run.max_steps={args.steps}"] + args.overrides
    try:
        base = load_config(None, BASE_OVERRIDES + extra)
    except ValueError as e:
        p.error(str(e))
    prepare_embedded(base, workers=args.workers)  # in the parent once: the workers find it cached
    t_prep = time.time() - t_start
    arms = [OPD] + [Arm("vgs", alpha=a) for a in alphas]
    jobs = [reference_job("default", extra, args.eval_rows, "", None)]
    jobs += [train_job(out, "default", arm, seed, args.overrides, args.eval_rows, "", args.steps, cache=False)
             for arm in arms for seed in range(args.seeds)]
    print(f"evaluating the teacher and the initial student, then distilling {len(jobs) - 1} runs "
          f"({', '.join(j['name'] for j in jobs[1:])}), {args.steps} steps each, on {args.workers} worker "
          "process(es) ...", flush=True)
    done = run_jobs(jobs, args.workers, desc="distilling")
    res, runs = dict(done[0]), done[1:]
    from .assess import outcome

    window = arm_config(OPD, extra).health.window
    for r in runs:
        r.update(outcome(r, res["initial"], window))
    oc = base.optim
    res.update(
        teacher_acc=res["teacher"]["acc"], initial_acc=res["initial"]["acc"], runs=runs, means=summarise(runs),
        settings={"steps": args.steps, "seeds": list(range(args.seeds)), "alphas": alphas, "lr": oc.lr,
                  "warmup_steps": oc.warmup_steps, "batch_size": oc.batch_size, "eval_rows": args.eval_rows,
                  "max_new_tokens": base.rollout.max_new_tokens, "overrides": BASE_OVERRIDES + extra,
                  "out": os.path.relpath(out)},
        versions={**versions(), "python": sys.version.split()[0]}, machine=describe(), threads=THREADS,
        prep_s=t_prep, wall_s=time.time() - t_start)
    res["against_study"] = against_study(res, load_study(args.study) if args.steps == STEPS else None)
    plot_curves(runs, os.path.join(out, "curves.png"))
    text = format_table(res)
    print("\n" + text)
    for r in runs:
        if r["collapsed"]:
            print(f"COLLAPSE: {r['name']} ({r['degenerate']:.0%} of greedy answers never end or loop, rollout "
                  f"accuracy over the last {window} steps {r['final_rollout_acc']:.2f}); sample: {r['sample'][:80]!r}")
    for c in res["against_study"]:
        outside = [f"seed {s} ({a:.3f})" for s, (a, ok) in enumerate(zip(c["runs"], c["inside"])) if not ok]
        print(f"{c['label']}: {sum(c['inside'])}/{len(c['inside'])} runs inside the study's 95 % interval for one "
              f"run [{c['study_acc_pred95'][0]:.3f}, {c['study_acc_pred95'][1]:.3f}]"
              + (f"; outside: {', '.join(outside)}" if outside else ""))
    if not res["against_study"]:
        print(f"(no study to compare with: {args.study} is missing or --steps differs from the study's {STEPS})")
    print(f"\nacc@1: greedy accuracy on {args.eval_rows} held-out questions (chance about 0.29); sampled acc: mean "
          "accuracy of 4 samples at T = 1; own phrasing: share of greedy answers that reason in the student's "
          "own words; KLs and prior gap: per response token of the student's own samples. collapsed: most greedy "
          "answers never end or loop, or rollout accuracy near 0 at the end; no gain: under the initial student "
          "+ 2 standard errors. What the comparison supports: the README's study section (make study).")
    print(f"wall time {res['wall_s']:.0f}s (preparation {t_prep:.0f}s); curves: {os.path.join(out, 'curves.png')}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(text + "\n")
    if args.readme:
        from .readme import write_section

        write_section(args.readme, "demo", readme_section(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
