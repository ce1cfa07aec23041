"""Gradient geometry per Visual-Dependency decile (paper Sec. 3.2, Fig. 3) and the ``vgs-analyze`` tool.

On the student's own sampled responses to held-out prompts, every response token gets the teacher's
VDS = KL(q || q'); tokens are split into ``bins`` (10) equal-frequency bins by VDS rank over all batches
(bin 0 = least visually dependent; bin sizes differ by at most one token). Per bin, the parameter
gradients of the three terms, each the mean over the bin's tokens:

* g_std  of KL(p  || q)    (standard, monolithic),
* g_vis  of KL(p  || r)    (visual grounding, r = softmax(sg(z_sp) + z_t - z_tp)),
* g_lang of KL(p' || q')   (language prior),

come from the pipeline's loss with beta = 0, alpha = 1, reduction ``token`` and the bin as mask:
g_std from mode ``standard``, g_vis = g(``vgs``) - g_std, g_lang = g(``language``) - g_std, taken first
w.r.t. the response hidden states and the lm_head (cheap), then pulled back to the parameters with
vector-Jacobian products through the model (batched in one vectorised backward pass). The table
holds the angles angle(g_lang, g_vis), angle(g_std, g_vis), angle(g_std, g_lang) in degrees, the
cosines and norms; written as CSV and a three-panel PNG.

Memory: 3 x bins gradient accumulators of the selected parameters (fp32); restrict them with a
parameter-name regex (``--params``) for large models. The ``vgs-analyze`` command line is in
:mod:`vgs_train.cli`.
"""

from __future__ import annotations

import csv
import os

import torch

from ..data.rng import fork_rng
from ..pipeline.gradients import angle_deg, cosine, norm, select_params
from ..pipeline.pipe import Hidden, Pipeline

TERMS = ("std", "vis", "lang")
PAIRS = (("lang", "vis"), ("std", "vis"), ("std", "lang"))
COLUMNS = (["bin", "tokens", "vds_min", "vds_max", "vds_mean", "norm_std", "norm_vis", "norm_lang"]
           + [f"cos_{a}_{b}" for a, b in PAIRS] + [f"angle_{a}_{b}" for a, b in PAIRS])


def equal_frequency_bins(values: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Bin index (0 .. bins-1) of each value by rank: bin sizes differ by at most one; ties are split
    by position (stable sort), so equal-frequency holds even with repeated values."""
    v = values.reshape(-1)
    n = v.numel()
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    order = torch.argsort(v.double(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(n, device=v.device)
    return (ranks * bins) // max(n, 1)


@torch.no_grad()
def teacher_vds(pipe: Pipeline, views) -> torch.Tensor:
    """[B, T] VDS = KL(q || q') of the teacher per response token (0 on masked tokens)."""
    out = pipe.loss(pipe.hidden(views), views.mask, mode="standard", alpha=1.0, beta=0.0, gamma=1.0,
                    threshold=None, return_per_token=True)
    return out.per_token["vds"]


def _hidden_term_grads(pipe: Pipeline, hidden: Hidden, bin_mask: torch.Tensor) -> dict:
    """Gradients of the std, vis and lang terms (summed over the bin's tokens) w.r.t. the student's two
    response hidden states and its lm_head weight: {term: (d_hs, d_hsp, d_W)}. Cheap: the fused loss
    computes them in its forward; no pass through the model."""
    hs, hsp, ws = hidden.student, hidden.student_text, pipe.student_head.weight
    count = float(bin_mask.sum())
    out = {}
    for mode in ("standard", "vgs", "language"):
        loss = pipe.loss(hidden, bin_mask, mode=mode, alpha=1.0, beta=0.0, gamma=1.0, reduction="token",
                         threshold=None, return_per_token=False).loss * count
        g = torch.autograd.grad(loss, (hs, hsp, ws), retain_graph=True, allow_unused=True)
        out[mode] = [torch.zeros_like(x) if y is None else y for x, y in zip((hs, hsp, ws), g)]
    std = out["standard"]
    return {"std": std, "vis": [a - b for a, b in zip(out["vgs"], std)],
            "lang": [a - b for a, b in zip(out["language"], std)]}


def _model_vjp(hidden: tuple, ws: torch.Tensor, params, terms: list, batched: bool = True) -> list:
    """Parameter gradients J^T g for each (d_hs, d_hsp, d_W) in ``terms``: one vectorised backward pass
    (``is_grads_batched``) where the model supports it, else one pass per entry. d_W is added to the
    lm_head parameter (the direct path; the embedding path of tied weights goes through J)."""
    hs, hsp = hidden[0], hidden[1]
    ps = [p for _, p in params]
    w_idx = next((i for i, p in enumerate(ps) if p is ws), None)

    def finish(gs, extra):
        gs = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for g, p in zip(gs, ps)]
        if w_idx is not None:
            gs[w_idx] = gs[w_idx] + extra.float()
        return gs

    if batched:
        try:
            gh = torch.stack([t[0] for t in terms])
            ghp = torch.stack([t[1] for t in terms])
            gs = torch.autograd.grad((hs, hsp), ps, grad_outputs=(gh, ghp), retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
            return [finish([None if g is None else g[k] for g in gs], terms[k][2]) for k in range(len(terms))]
        except (RuntimeError, NotImplementedError):
            pass  # an op without a batching rule: fall back to the loop
    res = []
    for t in terms:
        gs = torch.autograd.grad((hs, hsp), ps, grad_outputs=(t[0], t[1]), retain_graph=True, allow_unused=True)
        res.append(finish(list(gs), t[2]))
    return res


def angle_row(g: dict) -> dict:
    row = {f"norm_{t}": norm(g[t]) for t in TERMS}
    for a, b in PAIRS:
        c = cosine(g[a], g[b])
        row[f"cos_{a}_{b}"] = c
        row[f"angle_{a}_{b}"] = angle_deg(c)
    return row


def analyze_views(pipe: Pipeline, batches: list, params=None, *, bins: int = 10, progress=None,
                  return_bins: bool = False, vjp_batch: int = 30):
    """The per-bin table for a list of rollout batches (``ViewBatch``): one forward per batch, then the
    3 x bins parameter gradients as vector-Jacobian products through it, ``vjp_batch`` at a time in one
    vectorised backward pass (1 = one pass each; less memory). ``return_bins=True`` also returns each batch's [B, T] bin
    index map (-1 on masked tokens)."""
    params = params or select_params(pipe.student)
    vds = [teacher_vds(pipe, v) for v in batches]
    flat = torch.cat([d[v.mask] for d, v in zip(vds, batches)])
    if flat.numel() < bins:
        raise ValueError(f"{flat.numel()} response tokens cannot fill {bins} bins; sample more rollouts")
    bin_of = equal_frequency_bins(flat, bins)
    maps, start = [], 0
    for v in batches:
        m = torch.full(v.mask.shape, -1, dtype=torch.long, device=v.mask.device)
        n = int(v.mask.sum())
        m[v.mask] = bin_of[start:start + n].to(m.device)
        maps.append(m)
        start += n
    acc = [{t: [torch.zeros_like(p, dtype=torch.float32) for _, p in params] for t in TERMS} for _ in range(bins)]
    ws = pipe.student_head.weight
    for i, (v, m) in enumerate(zip(batches, maps)):
        hidden = pipe.hidden(v)
        keys, terms = [], []
        for b in range(bins):
            bm = m == b
            if not bool(bm.any()):
                continue
            h = _hidden_term_grads(pipe, hidden, bm)
            for t in TERMS:
                keys.append((b, t))
                terms.append(h[t])
        for j in range(0, len(terms), vjp_batch):
            for (b, t), g in zip(keys[j:j + vjp_batch], _model_vjp(hidden, ws, params, terms[j:j + vjp_batch])):
                for a, x in zip(acc[b][t], g):
                    a.add_(x)
        del hidden, terms
        if progress:
            progress(i)
    table = []
    for b in range(bins):
        sel = flat[bin_of == b]
        n = sel.numel()
        g = {t: [x / max(n, 1) for x in acc[b][t]] for t in TERMS}  # means over the bin's tokens
        table.append({"bin": b, "tokens": n, "vds_min": float(sel.min()), "vds_max": float(sel.max()),
                      "vds_mean": float(sel.mean()), **angle_row(g)})
    return (table, maps) if return_bins else table


def analyze(pipe: Pipeline, rows, *, batches: int = 4, batch_size: int = 16, bins: int = 10, params=None,
            seed: int = 0, progress=None, vjp_batch: int = 30) -> list[dict]:
    """On-policy rollouts for ``batches`` x ``batch_size`` of ``rows`` (in order), then :func:`analyze_views`."""
    views = []
    with fork_rng():
        torch.manual_seed(seed)
        for i in range(batches):
            chunk = [rows[(i * batch_size + j) % len(rows)] for j in range(batch_size)]
            views.append(pipe.sample(chunk).views)
    return analyze_views(pipe, views, params, bins=bins, progress=progress, vjp_batch=vjp_batch)


def write_csv(table: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for row in table:
            w.writerow({k: row[k] for k in COLUMNS})
    return path


def plot(table: list[dict], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["bin"] for r in table]
    names = {"lang": r"$g_{lang}$", "vis": r"$g_{vis}$", "std": r"$g_{std}$"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (a, b), tag in zip(axes, PAIRS, "abc"):
        ys = [r[f"angle_{a}_{b}"] for r in table]
        ax.plot(xs, ys, marker="o")
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        ax.set_title(f"({tag}) angle({names[a]}, {names[b]})")
        ax.set_xlabel("VDS decile bin (0 = least visual)")
        ax.set_ylabel("degrees")
        ax.set_xticks(xs)
        lo, hi = min(ys), max(ys)
        ax.set_ylim(max(0, lo - 10), min(180, hi + 10))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trend(table: list[dict], key: str = "angle_lang_vis") -> dict:
    """Least-squares slope (degrees per bin), Spearman rank correlation with the bin, first/last values."""
    xs = torch.tensor([r["bin"] for r in table], dtype=torch.float64)
    ys = torch.tensor([r[key] for r in table], dtype=torch.float64)
    xc = xs - xs.mean()
    slope = float((xc * (ys - ys.mean())).sum() / (xc * xc).sum()) if len(table) > 1 else float("nan")
    rx = torch.argsort(torch.argsort(xs)).double()
    ry = torch.argsort(torch.argsort(ys)).double()
    rxc, ryc = rx - rx.mean(), ry - ry.mean()
    den = float(rxc.norm() * ryc.norm())
    rho = float((rxc * ryc).sum()) / den if den > 0 else float("nan")
    return {"slope_deg_per_bin": slope, "spearman": rho, "first": float(ys[0]), "last": float(ys[-1])}


def format_table(table: list[dict]) -> str:
    head = (f"{'bin':>3}{'tokens':>7}{'vds_mean':>10}{'|g_std|':>10}{'|g_vis|':>10}{'|g_lang|':>10}"
            f"{'∠(lang,vis)':>13}{'∠(std,vis)':>12}{'∠(std,lang)':>13}")
    lines = [head, "-" * len(head)]
    for r in table:
        lines.append(f"{r['bin']:>3}{r['tokens']:>7}{r['vds_mean']:>10.4f}{r['norm_std']:>10.3g}"
                     f"{r['norm_vis']:>10.3g}{r['norm_lang']:>10.3g}{r['angle_lang_vis']:>13.1f}"
                     f"{r['angle_std_vis']:>12.1f}{r['angle_std_lang']:>13.1f}")
    return "\n".join(lines)


def readme_section(summary: dict) -> str:
    """The README's angle table (between the analyze markers), generated from ``angles.json``."""
    table = summary["table"]
    head = ["VDS decile"] + [str(r["bin"]) for r in table]
    rows = [["tokens"] + [str(r["tokens"]) for r in table],
            ["VDS mean"] + [f"{r['vds_mean']:.3g}" for r in table]]
    rows += [[f"∠({a}, {b})"] + [f"{r[f'angle_{a}_{b}']:.1f}" for r in table] for a, b in PAIRS]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    t = summary["trend"]["angle_lang_vis"]
    widening = t["slope_deg_per_bin"] > 0 and t["spearman"] > 0.5
    verdict = ("widens with VDS, as the paper reports" if widening else
               "does not widen with VDS here (the paper reports it widening)")
    return "\n".join([
        f"_Generated by `vgs-analyze --report {summary.get('out', 'runs/analyze')}/angles.json --readme README.md` "
        f"from a `vgs-analyze` run ({summary['batches']} batches of {summary['batch_size']} held-out prompts, "
        f"{sum(r['tokens'] for r in table):,} on-policy tokens, {summary['params']:,} student parameters); "
        "do not edit by hand._",
        "",
        *md,
        "",
        f"Measured: ∠(lang, vis) goes from {t['first']:.1f}° in the least to {t['last']:.1f}° in the most visually "
        f"dependent decile (least-squares slope {t['slope_deg_per_bin']:+.2f}° per decile, Spearman "
        f"{t['spearman']:+.2f}): the angle {verdict}.",
    ])
