"""Gradient-norm normaliser gamma (paper Eq. 15, App. A) and the ``vgs-calibrate`` tool.

    gamma = ||g_std|| / ||g_std + alpha * g_vis||
          = 1 / sqrt(1 + 2 alpha rho cos(phi) + alpha^2 rho^2),   rho = ||g_vis|| / ||g_std||     (Eq. 23)

g_std and g_vis are the *parameter* gradients of the standard term (mean KL(p||q)) and of the visual
term (mean KL(p||r)) on the student's own rollouts. They are measured with two autograd passes through
``fused_linear_vgs_loss``: mode ``standard`` gives g_std, the steering mode with beta = 0 (``vgs``:
std + alpha*vis) gives the denominator g_std + alpha*g_vis directly, and g_vis = (that - g_std) / alpha.
(For ``adaptive`` the steering term is w_t*vis, for ``language`` it is lang.)

The paper fixes gamma per model because the ratio is stable in training: ``GAMMA_PRESETS`` (alpha = 2).
``loss.gamma: auto`` in training measures gamma on each of the first K steps (using that step's own
gamma), then freezes the mean (:class:`AutoGamma`).

CLI: ``vgs-calibrate [CONFIG.yaml] [key=value ...] --batches N --write OUT.yaml``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

from vgs_kernels import fused_linear_vgs_loss

from .rng import fork_rng

# gamma at alpha = 2 from App. A of the paper (the model's name, case-insensitive, as in the config)
GAMMA_PRESETS = {"qwen3-vl-2b": 0.41, "qwen3-vl-4b": 0.36}
PRESET_ALPHA = 2.0


def gamma_preset(name: str, alpha: float) -> float:
    """``GAMMA_PRESETS`` lookup by name (``qwen3-vl-2b`` / ``qwen3-vl-4b``; a model path containing one of
    them, e.g. ``Qwen/Qwen3-VL-2B-Instruct``, also matches). Presets hold only at alpha = 2."""
    key = name.lower()
    hit = [v for k, v in GAMMA_PRESETS.items() if k in key]
    if not hit:
        raise ValueError(f"no gamma preset for {name!r}; presets: {sorted(GAMMA_PRESETS)} (or 'auto', or a number)")
    if abs(alpha - PRESET_ALPHA) > 1e-9:
        raise ValueError(f"gamma preset {name!r} was measured at alpha={PRESET_ALPHA}, not alpha={alpha}; "
                         "use gamma: auto or run vgs-calibrate")
    return hit[0]


# ---------------------------------------------------------------------------------------------- vectors
def select_params(model, pattern: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable (name, parameter) pairs, optionally those whose name matches regex ``pattern``
    (``re.search``). Tied weights appear once."""
    inner = getattr(model, "module", model)
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    if pattern:
        rx = re.compile(pattern)
        named = [(n, p) for n, p in named if rx.search(n)]
    if not named:
        raise ValueError(f"no trainable parameter matches {pattern!r}")
    return named


def param_grads(loss: torch.Tensor, params, *, retain_graph: bool = True) -> list[torch.Tensor]:
    """d loss / d params as fp32 tensors (zeros for parameters the loss does not reach)."""
    ps = [p for _, p in params] if params and isinstance(params[0], tuple) else list(params)
    gs = torch.autograd.grad(loss, ps, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float() for g, p in zip(gs, ps)]


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Sum over parameters of <a_i, b_i> (each in fp32 or fp64, accumulated in Python floats)."""
    return sum(float(torch.dot(x.reshape(-1), y.reshape(-1))) for x, y in zip(a, b))


def norm(a: list[torch.Tensor]) -> float:
    return math.sqrt(max(dot(a, a), 0.0))


def cosine(a, b) -> float:
    na, nb = norm(a), norm(b)
    return dot(a, b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def angle_deg(cos: float) -> float:
    return math.degrees(math.acos(min(1.0, max(-1.0, cos)))) if cos == cos else float("nan")


def _all_reduce_mean(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for g in grads:
            dist.all_reduce(g)
            g.div_(dist.get_world_size())
    return grads


# ---------------------------------------------------------------------------------------------- gamma
def steering_mode(mode: str) -> str:
    """The mode whose beta = 0 objective is std + alpha * (steering term)."""
    return "vgs" if mode in ("standard", "vgs") else mode


def term_gradients(hidden: tuple, weights: tuple, mask: torch.Tensor, params, *, mode: str = "vgs",
                   alpha: float = 2.0, vocab_size: int | None = None, loss_kwargs: dict | None = None,
                   retain_graph: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(g_std, g_std + alpha * g_steer) over ``params`` from the four response hidden states
    ``hidden = (hs, hsp, ht, htp)`` and lm_head ``weights = (w_student, w_teacher)``; two autograd passes."""
    hs, hsp, ht, htp = hidden
    ws, wt = weights
    kw = {k: v for k, v in (loss_kwargs or {}).items() if k not in ("mode", "alpha", "beta", "gamma")}
    kw.update(gamma=1.0, beta=0.0, alpha=alpha, vocab_size=vocab_size)
    l_std = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, mask, mode="standard", **kw).loss
    g_std = _all_reduce_mean(param_grads(l_std, params, retain_graph=True))
    l_den = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, mask, mode=steering_mode(mode), **kw).loss
    g_den = _all_reduce_mean(param_grads(l_den, params, retain_graph=retain_graph))
    return g_std, g_den


def gamma_stats(g_std, g_den, alpha: float) -> dict:
    """||g_std||, ||g_vis||, cos(phi), gamma (direct) and gamma from Eq. 23 (a consistency check)."""
    g_vis = [(d - s) / alpha for s, d in zip(g_std, g_den)]
    n_std, n_den, n_vis = norm(g_std), norm(g_den), norm(g_vis)
    cos = cosine(g_std, g_vis)
    gamma = n_std / n_den if n_den > 0 else float("nan")
    rho = n_vis / n_std if n_std > 0 else float("nan")
    eq23 = 1.0 / math.sqrt(max(1.0 + 2 * alpha * rho * cos + alpha ** 2 * rho ** 2, 1e-30)) \
        if rho == rho and cos == cos else float("nan")
    return {"norm_std": n_std, "norm_vis": n_vis, "norm_steered": n_den, "cos_phi": cos,
            "phi_deg": angle_deg(cos), "rho": rho, "gamma": gamma, "gamma_eq23": eq23}


def measure_gamma(student, teacher, views, params=None, *, mode: str = "vgs", alpha: float = 2.0,
                  vocab_size: int | None = None, loss_kwargs: dict | None = None) -> dict:
    """gamma statistics of one rollout batch (``views.ViewBatch``) for the student's ``params``
    (default: all trainable)."""
    from .views import four_view_hidden

    params = params or select_params(student)
    hidden = four_view_hidden(student, teacher, views)
    inner = getattr(student, "module", student)
    g_std, g_den = term_gradients(hidden, (inner.get_output_embeddings().weight,
                                           teacher.get_output_embeddings().weight), views.mask, params,
                                  mode=mode, alpha=alpha, vocab_size=vocab_size, loss_kwargs=loss_kwargs,
                                  retain_graph=False)
    out = gamma_stats(g_std, g_den, alpha)
    out["tokens"] = int(views.mask.sum())
    return out


def summarise(steps: list[dict], keys=("norm_std", "norm_vis", "cos_phi", "gamma", "gamma_eq23")) -> dict:
    out = {}
    for k in keys:
        xs = [s[k] for s in steps if s[k] == s[k]]
        mean = sum(xs) / len(xs) if xs else float("nan")
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
        out[k] = {"mean": mean, "std": math.sqrt(var)}
    return out


class AutoGamma:
    """``loss.gamma: auto``: on each of the first ``steps`` micro-batches gamma is measured (and that
    value is used for that micro-batch, i.e. the exact Eq. 15 normalisation); then the mean is frozen."""

    def __init__(self, steps: int = 10):
        if steps < 1:
            raise ValueError(f"gamma calibration steps must be >= 1, got {steps}")
        self.steps = steps
        self.history: list[dict] = []
        self.frozen: float | None = None

    @property
    def calibrating(self) -> bool:
        return self.frozen is None

    def measure(self, hidden, weights, mask, params, **kw) -> float:
        """Measure gamma on this micro-batch's hidden states (their graph is kept for the real loss)."""
        alpha = kw.get("alpha", 2.0)
        g_std, g_den = term_gradients(hidden, weights, mask, params, retain_graph=True, **kw)
        st = gamma_stats(g_std, g_den, alpha)
        self.history.append(st)
        if len(self.history) >= self.steps:
            self.frozen = summarise(self.history)["gamma"]["mean"]
        return st["gamma"] if st["gamma"] == st["gamma"] else 1.0

    @property
    def value(self) -> float:
        if self.frozen is not None:
            return self.frozen
        return self.history[-1]["gamma"] if self.history else 1.0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "history": self.history, "frozen": self.frozen}

    def load_state_dict(self, sd: dict) -> None:
        self.steps, self.history, self.frozen = sd["steps"], list(sd["history"]), sd["frozen"]


# ---------------------------------------------------------------------------------------------- tool
def load_setup(cfg, verbose: bool = True) -> dict:
    """Student, teacher (fp32, eval), processor, vocabulary size and paths from a ``TrainConfig``."""
    from .modeling import check_same_tokenizer, load_model, load_processor
    from .trainer import resolve_paths

    paths = resolve_paths(cfg, verbose)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = load_processor(paths["student"])
    tproc = load_processor(paths["teacher"])
    student = load_model(paths["student"], attn_implementation=cfg.model.attn_implementation).to(device)
    teacher = load_model(paths["teacher"], attn_implementation=cfg.model.attn_implementation).to(device)
    tok = getattr(proc, "tokenizer", proc)
    vocab = check_same_tokenizer(tok, getattr(tproc, "tokenizer", tproc), student, teacher)
    student.eval()  # dropout off: the gradients are measured, not trained on
    teacher.eval().requires_grad_(False)
    return {"student": student, "teacher": teacher, "processor": proc, "vocab_size": vocab, "paths": paths,
            "device": device}


def sample_views(student, builder, engine, rows, device, samples_per_prompt: int = 1):
    """On-policy rollouts (image view) -> ``ViewBatch`` with both prompt views."""
    from .views import build_views, repeat_prompt

    def mv(d):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()}

    img = mv(repeat_prompt(builder.encode(rows, with_image=True), samples_per_prompt))
    txt = mv(repeat_prompt(builder.encode(rows, with_image=False), samples_per_prompt))
    comp, mask = engine.generate(student, img, do_sample=True)
    return build_views(img, txt, comp, mask)


def calibrate(student, teacher, processor, rows, *, batches: int = 8, batch_size: int = 8,
              mode: str = "vgs", alpha: float = 2.0, vocab_size: int | None = None,
              loss_kwargs: dict | None = None, params=None, max_new_tokens: int = 48,
              temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, samples_per_prompt: int = 1,
              system_prompt: str | None = None, seed: int = 0, shuffle: bool = True,
              progress=None) -> dict:
    """gamma per batch on ``batches`` on-policy rollout batches of ``rows``; {"steps", "summary", ...}."""
    from .data import Sampler
    from .rollout import HFRolloutEngine
    from .views import PromptBuilder

    builder = PromptBuilder(processor, system_prompt)
    dev = next(student.parameters()).device
    engine = HFRolloutEngine(builder.tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, vocab_rows=student.get_output_embeddings().weight.shape[0])
    params = params or select_params(student)
    sampler = Sampler(len(rows), seed, shuffle)
    steps = []
    with fork_rng():  # the CPU and CUDA generators: manual_seed below reseeds both
        torch.manual_seed(seed)
        for i in range(batches):
            batch = [rows[j] for j in sampler.next(batch_size)]
            views = sample_views(student, builder, engine, batch, dev, samples_per_prompt)
            st = measure_gamma(student, teacher, views, params, mode=mode, alpha=alpha, vocab_size=vocab_size,
                               loss_kwargs=loss_kwargs)
            st["step"] = i
            steps.append(st)
            if progress:
                progress(st)
    return {"steps": steps, "summary": summarise(steps), "alpha": alpha, "mode": steering_mode(mode),
            "params": sum(p.numel() for _, p in params), "gamma": summarise(steps)["gamma"]["mean"]}


def write_gamma(gamma: float, out_path: str, config_path: str | None = None, alpha: float | None = None) -> str:
    """Write ``loss.gamma`` (and ``loss.alpha``) into a YAML config: a copy of ``config_path`` (its other
    keys unchanged) or a new file with only those keys."""
    import yaml

    data = {}
    if config_path:
        with open(config_path) as f:
            data = yaml.safe_load(f) or {}
    loss = data.setdefault("loss", {}) or {}
    data["loss"] = loss
    loss["gamma"] = round(float(gamma), 4)
    if alpha is not None:
        loss["alpha"] = float(alpha)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return out_path


def tool_setup(prog: str, args) -> tuple | None:
    """The shared start of ``vgs-calibrate`` and ``vgs-analyze``: config (+ overrides), seed, models,
    prompt rows of ``args.split`` and the parameters selected by ``args.params``.

    Returns (config_path, cfg, setup, rows, params), or None after printing the error (exit code 2).
    """
    from .cli import USER_ERRORS, report_error, split_config
    from .config import load_config
    from .data import load_dataset_rows

    config, overrides = split_config(args.config, args.overrides)
    # bad values and YAML syntax (ValueError), missing files / model folders (OSError): `prog: error: ...`
    try:
        cfg = load_config(config, overrides, check_paths=True)
        torch.manual_seed(cfg.run.seed)
        s = load_setup(cfg, verbose=not args.quiet)
        rows = load_dataset_rows(s["paths"][args.split] or s["paths"]["train"], cfg.data.image_root)
        params = select_params(s["student"], args.params or None)
    except USER_ERRORS as e:
        report_error(prog, e)
        return None
    return config, cfg, s, rows, params


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        print("vgs-calibrate: --batches must be >= 1", file=sys.stderr)
        return 2
    setup = tool_setup("vgs-calibrate", args)
    if setup is None:
        return 2
    config, cfg, s, rows, params = setup
    lk = loss_kwargs_of(cfg)
    mode = lk.pop("mode")
    alpha = lk.pop("alpha")
    rc = cfg.rollout
    if not args.quiet:
        print(f"{'step':>4}{'tokens':>8}{'||g_std||':>12}{'||g_vis||':>12}{'cos(phi)':>10}{'gamma':>9}", flush=True)

    def show(st):
        if not args.quiet:
            print(f"{st['step']:>4}{st['tokens']:>8}{st['norm_std']:>12.4g}{st['norm_vis']:>12.4g}"
                  f"{st['cos_phi']:>10.4f}{st['gamma']:>9.4f}", flush=True)

    res = calibrate(s["student"], s["teacher"], s["processor"], rows, batches=args.batches,
                    batch_size=args.batch_size or cfg.optim.batch_size, mode=mode, alpha=alpha,
                    vocab_size=s["vocab_size"], loss_kwargs=lk, params=params, max_new_tokens=rc.max_new_tokens,
                    temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                    samples_per_prompt=rc.samples_per_prompt, system_prompt=cfg.data.system_prompt or None,
                    seed=cfg.run.seed, progress=show)
    sm = res["summary"]
    res.update(student=s["paths"]["student"], teacher=s["paths"]["teacher"], param_pattern=args.params or None)
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


def loss_kwargs_of(cfg) -> dict:
    """The config's loss keywords with a numeric gamma (``auto`` / presets resolve to 1.0 here: the tools
    measure unnormalised gradients) and the VGS mode for GRPO / OPD methods."""
    lc = cfg.loss
    thr = lc.threshold
    if isinstance(thr, list):
        thr = tuple(thr)
    try:
        mode = cfg.loss_mode
    except (KeyError, AttributeError):
        mode = "vgs"
    if mode in (None, "standard"):
        mode = "vgs"
    return dict(mode=mode, alpha=lc.alpha, beta=lc.beta, gamma=1.0, quantile=lc.quantile,
                adaptive_quantiles=tuple(lc.adaptive_quantiles), threshold=thr, vds_scope=lc.vds_scope,
                temperature=lc.temperature, reduction=lc.reduction, detach_target_prior=lc.detach_target_prior,
                chunk_size=lc.chunk_size, backend=lc.backend)


if __name__ == "__main__":
    raise SystemExit(main())
