"""``make demo``: the whole embedded pipeline on CPU.

1. prepare (or reuse) the synthetic task, the SFT'd tiny teacher and the warmed-up tiny student;
2. evaluate teacher (with image / text-only) and the initial student;
3. distil the same student start with OPD and with VGS for the same steps and seeds;
4. evaluate both; print the table; save the training curves as a PNG.

Usage: python -m vgs_train.demo [--out runs/demo] [--steps N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads slow everyone down
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .rng import fork_rng

DEMO_OVERRIDES = [
    "optim.lr=2e-3", "optim.batch_size=16", "optim.grad_clip=1.0", "rollout.max_new_tokens=24",
    "run.save_every=0", "run.log_every=1", "eval.at_end=false", "eval.k=0",
]


@torch.no_grad()
def distill_gap(student, teacher, processor, rows, loss_kwargs: dict, *, batch_size: int = 50,
                max_new_tokens: int = 40, seed: int = 0) -> dict:
    """Mean std / vis / lang KL (and the teacher's VDS) of ``student`` against ``teacher`` on the student's
    own sampled responses (T=1) to held-out prompts."""
    from vgs_kernels import fused_linear_vgs_loss

    from .rollout import HFRolloutEngine
    from .views import PromptBuilder, build_views, four_view_hidden

    builder = PromptBuilder(processor)
    tok = builder.tokenizer
    engine = HFRolloutEngine(tok, max_new_tokens=max_new_tokens,
                             vocab_rows=student.get_output_embeddings().weight.shape[0])
    sums, count = {"std": 0.0, "vis": 0.0, "lang": 0.0, "vds": 0.0}, 0
    with fork_rng():
        torch.manual_seed(seed)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            img, txt = builder.encode(chunk, True), builder.encode(chunk, False)
            comp, mask = engine.generate(student, img, do_sample=True)
            views = build_views(img, txt, comp, mask)
            hs, hsp, ht, htp = four_view_hidden(student, teacher, views)
            out = fused_linear_vgs_loss(hs, hsp, student.get_output_embeddings().weight, ht, htp,
                                        teacher.get_output_embeddings().weight, views.mask,
                                        vocab_size=len(tok), **{**loss_kwargs, "mode": "vgs"})
            n = int(views.mask.sum())
            for k in sums:
                sums[k] += out.metrics[k] * n
            count += n
    return {k: v / max(count, 1) for k, v in sums.items()}


def plot_curves(histories: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss", "loss"), ("std", "std KL(p||q)"), ("vis", "vis KL(p||r)"), ("lang", "lang KL(p'||q')"),
            ("rollout_acc", "rollout accuracy")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (k, title) in zip(axes, keys):
        for name, hist in histories.items():
            xs = [m["step"] for m in hist]
            ys = [m[k] for m in hist]
            w = max(1, len(ys) // 15)  # moving average for readability
            sm = [sum(ys[max(0, j - w + 1):j + 1]) / len(ys[max(0, j - w + 1):j + 1]) for j in range(len(ys))]
            ax.plot(xs, ys, alpha=0.25)
            ax.plot(xs, sm, label=name, color=ax.lines[-1].get_color())
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgs_train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (runs, table, curves)")
    p.add_argument("--steps", type=int, default=150, help="distillation steps for each of OPD and VGS")
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from .config import load_config
    from .data import load_jsonl
    from .embedded import prepare_embedded
    from .evaluate import evaluate
    from .modeling import load_model, load_processor
    from .trainer import Trainer

    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    base = load_config(None, DEMO_OVERRIDES + [f"run.max_steps={args.steps}"] + args.overrides)
    paths = prepare_embedded(base)
    t_prep = time.time() - t_start
    proc = load_processor(paths["student"])
    teacher = load_model(paths["teacher"]).eval()
    student0 = load_model(paths["student"]).eval()
    rows = load_jsonl(paths["eval"])[:args.eval_rows]
    lk = base.loss_kwargs()
    mnt = base.rollout.max_new_tokens
    print("evaluating teacher and initial student ...", flush=True)
    table = []
    r = evaluate(teacher, proc, rows, k=0, max_new_tokens=mnt)
    table.append(("teacher", "image", r["acc@1"], None))
    r = evaluate(teacher, proc, rows, k=0, max_new_tokens=mnt, with_image=False)
    table.append(("teacher", "text-only", r["acc@1"], None))
    r = evaluate(student0, proc, rows, k=0, max_new_tokens=mnt)
    table.append(("initial student", "image", r["acc@1"], distill_gap(student0, teacher, proc, rows, lk,
                                                                       max_new_tokens=mnt)))
    histories = {}
    for method in ("opd", "vgs"):
        run_dir = os.path.join(out, method)
        if os.path.exists(run_dir):
            import shutil

            shutil.rmtree(run_dir)
        cfg = load_config(None, DEMO_OVERRIDES + [f"run.max_steps={args.steps}", f"loss.method={method}",
                                                  f"run.out_dir={run_dir}"] + args.overrides)
        print(f"distilling with {method.upper()} for {args.steps} steps ...", flush=True)
        trainer = Trainer(cfg, verbose=False)
        histories[method.upper()] = trainer.train()
        student = trainer.unwrapped.eval()
        r = evaluate(student, proc, rows, k=0, max_new_tokens=mnt)
        table.append((method.upper(), "image", r["acc@1"], distill_gap(student, teacher, proc, rows, lk,
                                                                         max_new_tokens=mnt)))
    plot_curves(histories, os.path.join(out, "curves.png"))
    wall = time.time() - t_start
    lines = [f"{'model':<16}{'view':<11}{'acc@1':>7}{'std KL':>9}{'vis KL':>9}{'lang KL':>9}",
             "-" * 61]
    for name, view, acc, gap in table:
        kl = "".join(f"{gap[k]:>9.3f}" for k in ("std", "vis", "lang")) if gap else f"{'-':>9}" * 3
        lines.append(f"{name:<16}{view:<11}{acc:>7.3f}{kl}")
    text = "\n".join(lines)
    print("\n" + text)
    if table[0][2] < 0.9:
        print(f"WARNING: the teacher reached only {table[0][2]:.3f} (< 0.90); raise embedded.teacher_sft_steps")
    print(f"\n(acc@1: greedy accuracy on {len(rows)} held-out synthetic questions, chance about 0.29; KLs: mean per "
          f"response token of the student's own samples against the teacher; {args.steps} distillation steps "
          f"each, same student start and seeds)")
    print(f"curves: {os.path.join(out, 'curves.png')}; wall time {wall:.0f}s (preparation {t_prep:.0f}s)")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"table": [dict(model=n, view=v, acc=a, **(g or {})) for n, v, a, g in table],
                   "steps": args.steps, "wall_s": wall, "prep_s": t_prep}, f, indent=2)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
