"""``make demo``: OPD against VGS on the embedded default, on a CPU, in minutes.

1. the synthetic task, and the teacher and student shipped with the package (the same models on every
   machine; other ``embedded`` settings prepare them locally, ``vgs_train.loops.embedded``);
2. evaluate the teacher (with and without the image) and the initial student;
3. distil the same student start with OPD, with VGS at the paper's alpha = 2 and at alpha = 0.5, each on two
   seeds (worker processes of one thread each: the numbers do not depend on the core count);
4. assess every run (greedy, per question type, text-only and sampled accuracy, the share of answers in the
   student's own words, divergences to the teacher, collapse, no gain); print the table beside the study's
   intervals (``vgs_train.tools.study``, docs/results/study.json) with a line per arm saying whether this machine's
   runs fall inside them; write ``results.json``, ``table.txt`` and ``curves.png`` into ``--out``.

    python -m vgs_train.tools.demo [--out runs/demo] [--steps N] [--seeds N] [--alphas 2,0.5] [key=value ...]
    python -m vgs_train.tools.demo --report runs/demo/results.json [--readme README.md]   # table / README only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .demo_report import against_study, format_table, load_study, plot_curves, readme_section, summarise
from .jobs import THREADS, Arm, run_jobs
from .readme import report
from .study import BASE_OVERRIDES, EVAL_ROWS, OPD, STEPS, VGS_LOW, VGS_PAPER

DEMO_SEEDS = 2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STUDY_JSON = os.path.join(REPO, "docs", "results", "study.json")


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgs_train.tools.demo", description=__doc__,
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
        return report(args.report, format_table, "demo", readme_section, args.readme)
    for name in ("steps", "seeds", "eval_rows", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        p.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    if any(not a > 0 for a in alphas):
        p.error(f"--alphas must be > 0, got {args.alphas!r}")
    from ..config import load_config
    from ..loops.embedded import prepare_embedded, versions
    from ..machine import describe
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
