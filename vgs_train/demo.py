"""``make demo``: OPD against VGS on the embedded default, on a CPU, reproducibly.

1. prepare (or reuse) the synthetic task, the tiny teacher and the tiny student; both are warmed up on
   the image and the text-only view, each in its own phrasing of the reasoning (``vgs_train.embedded``);
2. evaluate the teacher (with and without the image) and the initial student;
3. distil the same student start with OPD, with VGS at the paper's alpha = 2 and with VGS at the alpha we
   recommend at this scale, each on several seeds (worker processes of one thread each: the numbers do
   not depend on the machine's core count);
4. evaluate every run (greedy accuracy, the student's own phrasing, divergences to the teacher, the health
   of its language prior, collapse); print the table and write ``results.json``, ``table.txt`` and
   ``curves.png`` into ``--out``.

    python -m vgs_train.demo [--out runs/demo] [--steps N] [--seeds N] [--alphas 2,0.5] [key=value ...]
    python -m vgs_train.demo --report runs/demo/results.json [--readme README.md]   # table / README only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads slow everyone down
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .rng import fork_rng  # noqa: E402

PAPER_ALPHA = 2.0
RECOMMENDED_ALPHA = 0.5  # at this scale; see docs/demo.md
DEMO_STEPS = 300
DEMO_SEEDS = 2
DEMO_OVERRIDES = [
    "optim.lr=1e-3", "optim.warmup_steps=20", "optim.batch_size=16", "optim.grad_clip=1.0",
    "rollout.max_new_tokens=24", "run.save_every=0", "run.log_every=1", "run.progress=false",
    "health.window=25",  # 16 prompts a step: a shorter window's rollout accuracy is too noisy to warn on
    "eval.at_end=false", "eval.k=0",
]
THREADS = 1  # per process: fixed, so every machine computes the same numbers
HISTORY_KEYS = ("loss", "std", "vis", "lang", "prior_gap", "rollout_acc", "truncated")


# ---------------------------------------------------------------------------- measuring one model
@torch.no_grad()
def distill_gap(student, teacher, processor, rows, loss_kwargs: dict, *, batch_size: int = 50,
                max_new_tokens: int = 40, seed: int = 0) -> dict:
    """Mean std / vis / lang KL and the teacher's VDS of ``student`` against ``teacher`` per response token
    of the student's own samples (T = 1) to ``rows``, and the prior gap (``vgs_train.health.prior_gap``)."""
    from .health import prior_gap_terms
    from .modeling import lm_head_rows
    from .pipeline import Pipeline
    from .rollout import HFRolloutEngine
    from .views import PromptBuilder

    builder = PromptBuilder(processor)
    tok = builder.tokenizer
    engine = HFRolloutEngine(tok, max_new_tokens=max_new_tokens, vocab_rows=lm_head_rows(student))
    kw = {k: v for k, v in loss_kwargs.items() if k not in ("mode", "return_per_token")}
    pipe = Pipeline(student, teacher, builder, engine, len(tok), {**kw, "mode": "vgs", "return_per_token": True})
    sums, count, gap_sum, gap_n = {"std": 0.0, "vis": 0.0, "lang": 0.0, "vds": 0.0}, 0, 0.0, 0
    with fork_rng():
        torch.manual_seed(seed)
        for i in range(0, len(rows), batch_size):
            views = pipe.sample(rows[i:i + batch_size]).views
            out = pipe.loss(pipe.hidden(views), views.mask)
            n = int(views.mask.sum())
            for k in sums:
                sums[k] += out.metrics[k] * n
            count += n
            total, n_low = prior_gap_terms(out.per_token, views.mask)
            gap_sum += float(total)
            gap_n += n_low
    res = {k: v / max(count, 1) for k, v in sums.items()}
    res["prior_gap"] = gap_sum / gap_n if gap_n else float("nan")
    return res


@torch.no_grad()
def own_phrasing_probability(model, processor, rows, *, batch_size: int = 50) -> float:
    """How much ``model`` prefers the student's words to the teacher's for its reasoning: the mean over
    ``rows`` (image view) of P(own) / (P(own) + P(teacher's)), P the probability of the phrasing's opening
    ("<reason>I see a" against "<reason>The picture shows a"). A continuous measure: the greedy answers'
    share flips from 1 to 0 as soon as the preference crosses one half."""
    from . import synthetic
    from .embedded import encode_targets
    from .views import PromptBuilder, append_completion, response_hidden

    builder = PromptBuilder(processor)
    tok = builder.tokenizer
    openings = [synthetic.reference_response(synthetic.PHRASINGS[p].split("{")[0].rstrip(), "")
                .replace("</reason>", "") for p in ("student", "teacher")]
    total = 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = builder.encode(chunk, with_image=True)
        logp = []
        for text in openings:
            ids, mask = encode_targets(tok, [text] * len(chunk))
            ids, mask = ids[:, :-1], mask[:, :-1]  # without the end token encode_targets appends
            h = response_hidden(model, append_completion(enc, ids, mask), ids.shape[1])
            lp = torch.log_softmax(model.get_output_embeddings()(h).float(), -1)
            logp.append(lp.gather(-1, ids[..., None])[..., 0].masked_fill(~mask, 0).sum(1))
        total += float(torch.sigmoid(logp[0] - logp[1]).sum())
    return total / len(rows)


def assess(model, teacher, processor, rows, loss_kwargs: dict, max_new_tokens: int, *, with_image: bool = True,
           gap: bool = True) -> dict:
    """Greedy acc@1, truncated share and phrasing on ``rows``; with ``gap`` also the divergences."""
    from . import synthetic
    from .evaluate import evaluate

    r = evaluate(model, processor, rows, k=0, max_new_tokens=max_new_tokens, with_image=with_image,
                 return_completions=True)
    kinds = [synthetic.phrasing_of(t) for t in r["completions"]]
    out = {"acc": r["acc@1"], "truncated": r["truncated"],
           "own_phrasing": own_phrasing_probability(model, processor, rows) if with_image else float("nan"),
           "greedy_own_phrasing": kinds.count("student") / len(kinds),
           "greedy_teacher_phrasing": kinds.count("teacher") / len(kinds), "sample": r["completions"][0]}
    if gap:
        out.update(distill_gap(model, teacher, processor, rows, loss_kwargs, max_new_tokens=max_new_tokens))
    return out


# ---------------------------------------------------------------------------- one distillation run
def run_name(method: str, alpha: float | None, seed: int) -> str:
    return f"{method}-seed{seed}" if alpha is None else f"{method}-alpha{alpha:g}-seed{seed}"


def train_run(job: dict) -> dict:
    """Distil one student (a worker process, or inline): train, then assess the result."""
    torch.set_num_threads(THREADS)
    _quiet_transformers()
    from .config import load_config
    from .data import load_jsonl
    from .health import SIGNALS
    from .modeling import load_model, load_processor
    from .trainer import Trainer

    cfg = load_config(None, job["overrides"])
    queue = job.get("queue")
    trainer = Trainer(cfg, verbose=False)

    def on_step(m, warnings):
        if queue is not None:
            queue.put((job["name"], [f"{job['name']} step {m['step']}: {w}" for w in warnings]))

    t0 = time.time()
    history = trainer.train(on_step=on_step)
    train_s = time.time() - t0
    student = trainer.unwrapped.eval()
    trainer.close()
    proc = load_processor(trainer.paths["student"])
    teacher = load_model(trainer.paths["teacher"]).eval()
    rows = load_jsonl(trainer.paths["eval"])[:job["eval_rows"]]
    res = assess(student, teacher, proc, rows, cfg.loss_kwargs(), cfg.rollout.max_new_tokens)
    end_flags = {k: bool(history[-1][f"health_{k}"]) for k in SIGNALS}
    ever = {k: any(m[f"health_{k}"] for m in history) for k in SIGNALS}
    # collapsed: the student ends worse than it started, or its answers stop ending, or its rollouts are
    # collapsing at the end (the prior-gap warning is a risk, not a collapse)
    collapsed = (res["acc"] < job["initial_acc"] or res["truncated"] > 0.5
                 or any(end_flags[k] for k in ("acc_drop", "truncated", "std_rise")))
    return {"name": job["name"], "method": job["method"], "alpha": job["alpha"], "seed": job["seed"],
            **res, "collapsed": collapsed, "flags_at_end": end_flags, "flags_ever": ever, "train_s": train_s,
            "history": [{"step": m["step"], **{k: m.get(k, float("nan")) for k in HISTORY_KEYS}}
                        for m in history]}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run_jobs(jobs: list[dict], workers: int, total_steps: int) -> list[dict]:
    """Run ``jobs`` on ``workers`` processes (1: inline) with one progress bar over all their steps."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="distilling", unit="step", dynamic_ncols=True)
    try:
        if workers <= 1:
            class Inline:
                def put(self, item):
                    _show_step(bar, item[1])

            return [train_run({**j, "queue": Inline()}) for j in jobs]
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            queue = manager.Queue()
            futures = [pool.submit(train_run, {**j, "queue": queue}) for j in jobs]
            while not all(f.done() for f in futures):
                _drain(queue, bar, timeout=0.5)
            _drain(queue, bar, timeout=0)
            return [f.result() for f in futures]
    finally:
        bar.close()


def _drain(queue, bar, timeout: float) -> None:
    import queue as queue_mod

    try:
        while True:
            _, warnings = queue.get(timeout=timeout)
            _show_step(bar, warnings)
            timeout = 0
    except queue_mod.Empty:
        pass


def _show_step(bar, warnings: list[str]) -> None:
    """One finished training step of some run: advance the bar, print the run's new health warnings."""
    bar.update(1)
    for w in warnings:
        bar.write(w)


# ---------------------------------------------------------------------------- results, table, README
def summarise(runs: list[dict]) -> list[dict]:
    """Mean over seeds per (method, alpha)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["alpha"]), []).append(r)
    out = []
    for (method, alpha), rs in groups.items():
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("acc", "std", "vis", "lang", "prior_gap",
                                                               "own_phrasing", "truncated")}
        out.append({"method": method, "alpha": alpha, "seeds": len(rs), **mean,
                    "collapsed": sum(r["collapsed"] for r in rs)})
    return out


def _label(run: dict) -> str:
    return run["method"].upper() + ("" if run["alpha"] is None else f" (alpha {run['alpha']:g})")


def _f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_rows(res: dict) -> list[list[str]]:
    """The demo table as rows of cells (header first)."""
    rows = [["model", "alpha", "seed", "acc@1", "own phrasing", "std KL", "vis KL", "lang KL", "prior gap",
             "collapsed"]]
    t, s = res["teacher"], res["initial"]
    rows.append(["teacher, image", "-", "-", _f(t["acc"]), _f(t["own_phrasing"]), "-", "-", "-", "-", "-"])
    rows.append(["teacher, text-only", "-", "-", _f(res["teacher_text"]["acc"]), "-", "-", "-", "-", "-", "-"])
    rows.append(["initial student", "-", "-", _f(s["acc"]), _f(s["own_phrasing"]), _f(s["std"]), _f(s["vis"]),
                 _f(s["lang"]), _f(s["prior_gap"]), "-"])
    means = {(m["method"], m["alpha"]): m for m in res["means"]}
    for key, mean in means.items():
        for r in (r for r in res["runs"] if (r["method"], r["alpha"]) == key):
            rows.append([r["method"].upper(), _f(r["alpha"], "g"), str(r["seed"]), _f(r["acc"]),
                         _f(r["own_phrasing"]), _f(r["std"]), _f(r["vis"]), _f(r["lang"]), _f(r["prior_gap"]),
                         "yes" if r["collapsed"] else "no"])
        rows.append([f"{mean['method'].upper()} mean", _f(mean["alpha"], "g"), f"{mean['seeds']} seeds",
                     _f(mean["acc"]), _f(mean["own_phrasing"]), _f(mean["std"]), _f(mean["vis"]),
                     _f(mean["lang"]), _f(mean["prior_gap"]), f"{mean['collapsed']}/{mean['seeds']}"])
    return rows


def format_table(res: dict) -> str:
    rows = table_rows(res)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def gap_closed(res: dict, method: str, alpha=None) -> float:
    """Share of the acc@1 gap between the initial student and the teacher that a method's mean closes."""
    m = next(m for m in res["means"] if m["method"] == method and m["alpha"] == alpha)
    gap = res["teacher"]["acc"] - res["initial"]["acc"]
    return (m["acc"] - res["initial"]["acc"]) / gap if gap > 0 else float("nan")


def readme_section(res: dict) -> str:
    """The README's demo section (between the demo markers), generated from ``results.json``."""
    rows = table_rows(res)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    st = res["settings"]
    closed = [f"{_label(m)} {_f(100 * gap_closed(res, m['method'], m['alpha']), '.0f')} %" for m in res["means"]]
    return "\n".join([
        f"_Generated by `python -m vgs_train.demo --report {st['out']}/results.json --readme README.md` from a "
        f"cold-cache `make demo` run ({res['machine']}, {res['wall_s']:.0f} s wall, of which preparation "
        f"{res['prep_s']:.0f} s; torch {res['versions']['torch']}, transformers {res['versions']['transformers']}); "
        "do not edit by hand._",
        "",
        f"{st['steps']} distillation steps per run, {st['batch_size']} prompts per step, lr {st['lr']:g} "
        f"(warm-up {st['warmup_steps']} steps), seeds {', '.join(str(s) for s in st['seeds'])}; acc@1 and "
        f"phrasing on {st['eval_rows']} held-out prompts (greedy), KLs and prior gap per response token of "
        "the student's own samples.",
        "",
        *md,
        "",
        "Share of the acc@1 gap between the initial student and the teacher closed (mean over seeds): "
        + "; ".join(closed) + ".",
    ])


def write_readme(res: dict, path: str) -> None:
    from .readme import write_section

    write_section(path, "demo", readme_section(res))


def plot_curves(runs: list[dict], path: str) -> None:
    """Every run's training curves (moving averages over 10 steps; one colour per method, one line per seed)."""
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
            label = r["method"].upper() + ("" if r["alpha"] is None else f" alpha={r['alpha']:g}")
            colour = colours.setdefault(label, f"C{len(colours)}")
            xs = [m["step"] for m in r["history"]]
            ys = [m[k] for m in r["history"]]
            sm = [_mean(ys[max(0, j - 9):j + 1]) for j in range(len(ys))]
            ax.plot(xs, sm, color=colour, linestyle=styles[r["seed"] % len(styles)],
                    label=f"{label}, seed {r['seed']}")
        ax.set_title(title)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------- main
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgs_train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (runs, table, curves, results.json)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="distillation steps per run")
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help="seeds per method (0, 1, ...)")
    p.add_argument("--alphas", default=f"{PAPER_ALPHA:g},{RECOMMENDED_ALPHA:g}",
                   help="comma-separated VGS alphas (default: the paper's and the one recommended here)")
    p.add_argument("--eval-rows", type=int, default=200, help="held-out prompts to evaluate on")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="training processes in parallel (one thread each; the numbers do not depend on it)")
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
            write_readme(res, args.readme)
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
    torch.set_num_threads(THREADS)
    _quiet_transformers()
    from .config import load_config
    from .data import load_jsonl
    from .embedded import prepare_embedded, versions
    from .modeling import load_model, load_processor

    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    common = DEMO_OVERRIDES + [f"run.max_steps={args.steps}"] + args.overrides
    try:
        base = load_config(None, common)
    except ValueError as e:
        p.error(str(e))
    paths = prepare_embedded(base, workers=args.workers)
    t_prep = time.time() - t_start
    proc = load_processor(paths["student"])
    teacher = load_model(paths["teacher"]).eval()
    student0 = load_model(paths["student"]).eval()
    rows = load_jsonl(paths["eval"])[:args.eval_rows]
    lk, mnt = base.loss_kwargs(), base.rollout.max_new_tokens
    print("evaluating the teacher and the initial student ...", flush=True)
    res = {"teacher": assess(teacher, teacher, proc, rows, lk, mnt, gap=False),
           "teacher_text": assess(teacher, teacher, proc, rows, lk, mnt, with_image=False, gap=False),
           "initial": assess(student0, teacher, proc, rows, lk, mnt),
           "initial_text": assess(student0, teacher, proc, rows, lk, mnt, with_image=False, gap=False)}
    specs = [("opd", None)] + [("vgs", a) for a in alphas]
    jobs = []
    for method, alpha in specs:
        for seed in range(args.seeds):
            name = run_name(method, alpha, seed)
            run_dir = os.path.join(out, name)
            shutil.rmtree(run_dir, ignore_errors=True)
            extra = [f"loss.method={method}", f"run.seed={seed}", f"run.out_dir={run_dir}"]
            if alpha is not None:
                extra.append(f"loss.alpha={alpha}")
            jobs.append({"name": name, "method": method, "alpha": alpha, "seed": seed, "eval_rows": args.eval_rows,
                         "initial_acc": res["initial"]["acc"], "overrides": common + extra})
    print(f"distilling {len(jobs)} runs ({', '.join(j['name'] for j in jobs)}), {args.steps} steps each, "
          f"on {args.workers} worker process(es) ...", flush=True)
    runs = run_jobs(jobs, args.workers, total_steps=args.steps * len(jobs))
    oc = base.optim
    res.update(
        teacher_acc=res["teacher"]["acc"], initial_acc=res["initial"]["acc"], runs=runs, means=summarise(runs),
        settings={"steps": args.steps, "seeds": list(range(args.seeds)), "alphas": alphas, "lr": oc.lr,
                  "warmup_steps": oc.warmup_steps, "batch_size": oc.batch_size, "eval_rows": len(rows),
                  "max_new_tokens": mnt, "overrides": common, "out": os.path.relpath(out)},
        versions={**versions(), "python": sys.version.split()[0]}, machine=_machine(), threads=THREADS,
        prep_s=t_prep, wall_s=time.time() - t_start)
    plot_curves(runs, os.path.join(out, "curves.png"))
    text = format_table(res)
    print("\n" + text)
    for r in runs:
        if r["collapsed"]:
            print(f"COLLAPSE: {r['name']} ended collapsed (flags {[k for k, v in r['flags_at_end'].items() if v]}, "
                  f"{r['truncated']:.0%} of greedy answers truncated); sample: {r['sample'][:80]!r}")
    if res["teacher"]["acc"] < 0.9:
        print(f"WARNING: the teacher reached only {res['teacher']['acc']:.3f} (< 0.90); raise "
              "embedded.teacher_sft_steps")
    print(f"\nacc@1: greedy accuracy on {len(rows)} held-out questions (chance about 0.29); own phrasing: share "
          "of answers that reason in the student's own words; KLs and prior gap: per response token of the "
          f"student's own samples. {args.steps} steps per run, same student start.")
    print(f"wall time {res['wall_s']:.0f}s (preparation {t_prep:.0f}s); curves: {os.path.join(out, 'curves.png')}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(text + "\n")
    if args.readme:
        write_readme(res, args.readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
