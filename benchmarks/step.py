"""Step benchmark: one training step of standard OPD against VGS on the same models, batch and rollouts.

    python -m benchmarks.step                      # CPU: tiny Qwen3-VL models; GPU: 2B/8B-sized models
    python -m benchmarks.step --quick              # CI-sized (seconds)
    python -m benchmarks.step --preset qwen3vl-2b-8b --check-config   # build the big configs on 'meta' only

Self-contained on purpose (it does not use ``vgs_train``): randomly initialised
``Qwen3VLForConditionalGeneration`` student and teacher built from ``transformers.Qwen3VLConfig``
(no download), random token batches with one synthetic image per prompt, and AdamW on the student.

One step, per method, timed phase by phase (``torch.cuda.synchronize`` between phases on GPU):

1. ``rollout``: ``student.generate`` samples exactly ``response`` tokens per prompt (no early stop).
   It is identical work for every method, so by default it is timed once per repeat and that time
   is counted in each method's step (``--rollout-per-method`` generates in every step); the
   sampled tokens are then replaced by fixed random response tokens so that every method trains
   on the same batch.
2. ``forwards``: hidden states at the response positions (``model.model``, no logits):
   * ``opd``  (standard on-policy distillation): student with image (grad), teacher with image (no_grad);
   * ``vgs``  : the same two plus student without image (grad) and teacher without image (no_grad);
   * ``opd4`` : the four forwards of ``vgs`` but the standard loss -- isolates the cost of the loss.
3. ``loss_backward``: ``fused_linear_vgs_loss(mode="standard" | "vgs")`` on the hidden states and the
   lm_head weights, then ``loss.backward()`` through the student (both views for VGS).
   ``opd`` passes None for the text-only hidden states (``mode="standard"`` does not read them and
   skips their lm_head GEMMs); ``opd4`` passes its real text-only hidden states.
4. ``optimizer``: ``AdamW.step()`` and ``zero_grad(set_to_none=True)``.

Methods alternate within each repeat (order reversed every other repeat); we report medians per
phase and of the whole step over ``n`` repeats (``n`` in every method's result and table row), and
the VGS/OPD ratios of the whole step and of the non-generation part (forwards + loss/backward +
optimizer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import common as C

PHASES = ("rollout", "forwards", "loss_backward", "optimizer")
METHODS = ("opd", "vgs", "opd4")


@dataclass
class TextSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    mrope: list
    tie: bool


@dataclass
class VisionSize:
    depth: int
    hidden: int
    heads: int
    intermediate: int
    deepstack: list
    num_position_embeddings: int


@dataclass
class Preset:
    student: TextSize
    student_vision: VisionSize
    teacher: TextSize
    teacher_vision: VisionSize
    vocab: int  # lm_head rows
    loss_vocab: int | None  # vocab_size passed to the loss (tokenizer ids), None = all rows
    dtype: str
    batch: int
    prompt_text: int  # text tokens of the prompt around the image
    image_grid: tuple  # (h, w) in 16-px patches; image tokens = h * w / 4
    response: int
    gradient_checkpointing: bool = False
    notes: list = field(default_factory=list)


_TINY_VISION = VisionSize(depth=2, hidden=64, heads=4, intermediate=128, deepstack=[0], num_position_embeddings=64)
PRESETS = {
    # The tiny sizes of vgs_train.config.TinyModelConfig (student), a teacher twice as wide; vocabulary 2048.
    "tiny": Preset(
        student=TextSize(64, 2, 4, 2, 16, 128, [4, 2, 2], True), student_vision=_TINY_VISION,
        teacher=TextSize(128, 2, 4, 2, 32, 256, [8, 4, 4], True), teacher_vision=_TINY_VISION,
        vocab=2048, loss_vocab=None, dtype="float32", batch=4, prompt_text=16, image_grid=(8, 8), response=64,
    ),
    "quick": Preset(
        student=TextSize(64, 2, 4, 2, 16, 128, [4, 2, 2], True), student_vision=_TINY_VISION,
        teacher=TextSize(128, 2, 4, 2, 32, 256, [8, 4, 4], True), teacher_vision=_TINY_VISION,
        vocab=1024, loss_vocab=None, dtype="float32", batch=2, prompt_text=8, image_grid=(4, 4), response=8,
    ),
    # Wider than tiny, with the kernel benchmark's CPU vocabulary, so the loss weighs as it does at scale.
    "small": Preset(
        student=TextSize(256, 4, 4, 2, 64, 768, [16, 8, 8], True),
        student_vision=VisionSize(depth=2, hidden=128, heads=4, intermediate=256, deepstack=[1],
                                  num_position_embeddings=64),
        teacher=TextSize(512, 4, 8, 4, 64, 1536, [16, 8, 8], True),
        teacher_vision=VisionSize(depth=2, hidden=128, heads=4, intermediate=256, deepstack=[1],
                                  num_position_embeddings=64),
        vocab=32000, loss_vocab=None, dtype="float32", batch=4, prompt_text=32, image_grid=(8, 8), response=128,
    ),
    # Qwen3-VL-2B student and -8B teacher sizes (their public config files), random weights, bf16.
    "qwen3vl-2b-8b": Preset(
        student=TextSize(2048, 28, 16, 8, 128, 6144, [24, 20, 20], True),
        student_vision=VisionSize(24, 1024, 16, 4096, [5, 11, 17], 2304),
        teacher=TextSize(4096, 36, 32, 8, 128, 12288, [24, 20, 20], False),
        teacher_vision=VisionSize(27, 1152, 16, 4304, [8, 16, 24], 2304),
        vocab=151936, loss_vocab=151669, dtype="bfloat16", batch=8, prompt_text=64, image_grid=(28, 28),
        response=1024, gradient_checkpointing=True,
        notes=["student gradient checkpointing on (as in real OPD training at this size)"],
    ),
}

# Special ids at the top of the vocabulary for the small vocabularies; Qwen's own for the full one.
QWEN_IDS = dict(image=151655, video=151656, vision_start=151652, vision_end=151653, eos=151645, pad=151643)


def special_ids(vocab: int) -> dict:
    if vocab > 151656:
        return dict(QWEN_IDS)
    return dict(image=vocab - 10, video=vocab - 9, vision_start=vocab - 8, vision_end=vocab - 7, eos=vocab - 6,
                pad=vocab - 5)


def build_config(text: TextSize, vision: VisionSize, vocab: int):
    from transformers import Qwen3VLConfig

    ids = special_ids(vocab)
    text_cfg = dict(
        vocab_size=vocab, hidden_size=text.hidden, intermediate_size=text.intermediate,
        num_hidden_layers=text.layers, num_attention_heads=text.heads, num_key_value_heads=text.kv_heads,
        head_dim=text.head_dim, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": list(text.mrope),
                         "mrope_interleaved": True},
        tie_word_embeddings=text.tie, pad_token_id=ids["pad"],
    )
    vision_cfg = dict(
        depth=vision.depth, hidden_size=vision.hidden, num_heads=vision.heads, intermediate_size=vision.intermediate,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text.hidden,
        num_position_embeddings=vision.num_position_embeddings, deepstack_visual_indexes=list(vision.deepstack),
    )
    return Qwen3VLConfig(
        text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=text.tie,
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )


def build_model(text: TextSize, vision: VisionSize, vocab: int, dtype, device, seed: int):
    from transformers import Qwen3VLForConditionalGeneration

    cfg = build_config(text, vision, vocab)
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of a big model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                model = Qwen3VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype=dtype)


@dataclass
class Batch:
    img_prompt: torch.Tensor  # [B, P_img] with the image tokens
    txt_prompt: torch.Tensor  # [B, P_txt] the same text without the image
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    response: torch.Tensor  # [B, R]
    image_id: int

    def mm_types(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids == self.image_id).int()


def make_batch(p: Preset, device, dtype, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = special_ids(p.vocab)
    lo = min(ids.values())
    b, (gh, gw) = p.batch, p.image_grid
    n_img = gh * gw // 4
    pre = torch.randint(0, lo, (b, p.prompt_text // 2), generator=g)
    post = torch.randint(0, lo, (b, p.prompt_text - p.prompt_text // 2), generator=g)
    vis = torch.cat([torch.full((b, 1), ids["vision_start"]), torch.full((b, n_img), ids["image"]),
                     torch.full((b, 1), ids["vision_end"])], 1)
    img_prompt = torch.cat([pre, vis, post], 1)
    txt_prompt = torch.cat([pre, post], 1)
    pixels = torch.randn(b * gh * gw, 3 * 2 * 16 * 16, generator=g)
    thw = torch.tensor([[1, gh, gw]] * b)
    resp = torch.randint(0, lo, (b, p.response), generator=g)
    return Batch(img_prompt.to(device), txt_prompt.to(device), pixels.to(device=device, dtype=dtype), thw.to(device),
                 resp.to(device), ids["image"])


def response_hidden(model, prompt, response, batch: Batch, with_image: bool) -> torch.Tensor:
    """Last-layer hidden states at the positions that predict the response tokens: [B, R, H]."""
    ids = torch.cat([prompt, response], 1)
    kw = {}
    if with_image:
        kw = dict(pixel_values=batch.pixel_values, image_grid_thw=batch.grid_thw, mm_token_type_ids=batch.mm_types(ids))
    h = model.model(input_ids=ids, use_cache=False, **kw).last_hidden_state
    p, r = prompt.shape[1], response.shape[1]
    return h[:, p - 1:p - 1 + r]


class Stepper:
    def __init__(self, student, teacher, opt, batch: Batch, preset: Preset, device, rollout: bool):
        self.student, self.teacher, self.opt = student, teacher, opt
        self.batch, self.p, self.device, self.rollout = batch, preset, device, rollout
        self.mask = torch.ones(batch.response.shape, dtype=torch.bool, device=device)

    def _t(self):
        C.sync(self.device)
        return time.perf_counter()

    def generate(self) -> float:
        """One rollout (seconds): the student samples exactly ``response`` tokens per prompt."""
        b, s = self.batch, self.student
        t0 = self._t()
        if self.rollout:
            s.eval()
            with torch.no_grad():
                gen = s.generate(
                    input_ids=b.img_prompt, pixel_values=b.pixel_values, image_grid_thw=b.grid_thw,
                    mm_token_type_ids=b.mm_types(b.img_prompt), max_new_tokens=self.p.response,
                    min_new_tokens=self.p.response, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                    pad_token_id=special_ids(self.p.vocab)["pad"],
                )
            assert gen.shape[1] == b.img_prompt.shape[1] + self.p.response, gen.shape
            del gen
            s.train()
        return self._t() - t0

    def step(self, method: str, rollout_s: float | None = None) -> dict:
        """One training step; the rollout is generated here unless its time ``rollout_s`` is given
        (measured once for all methods: it is the same work for every method)."""
        from vgs_kernels import fused_linear_vgs_loss

        b, s, t = self.batch, self.student, self.teacher
        out = {"rollout": self.generate() if rollout_s is None else rollout_s}
        t1 = self._t()
        resp = b.response
        four = method in ("vgs", "opd4")
        hs = response_hidden(s, b.img_prompt, resp, b, True)
        hsp = response_hidden(s, b.txt_prompt, resp, b, False) if four else None
        with torch.no_grad():
            ht = response_hidden(t, b.img_prompt, resp, b, True)
            htp = response_hidden(t, b.txt_prompt, resp, b, False) if four else None
        t2 = self._t()
        out["forwards"] = t2 - t1
        res = fused_linear_vgs_loss(
            hs, hsp, s.lm_head.weight, ht, htp, t.lm_head.weight, self.mask,
            mode="vgs" if method == "vgs" else "standard", vocab_size=self.p.loss_vocab,
        )
        res.loss.backward()
        t3 = self._t()
        out["loss_backward"] = t3 - t2
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t4 = self._t()
        out["optimizer"] = t4 - t3
        out["non_generation"] = t4 - t1
        out["step"] = out["rollout"] + out["non_generation"]
        out["loss"] = float(res.loss.detach())
        return out


def run(args) -> dict:
    device = C.pick_device(args.device)
    preset_name = args.preset or ("quick" if args.quick else ("qwen3vl-2b-8b" if device.type == "cuda" else "tiny"))
    p = replace(PRESETS[preset_name], **{k: getattr(args, k) for k in ("batch", "response") if getattr(args, k)})
    dtype = getattr(torch, p.dtype)
    doc = C.header(device, args, "step")
    doc.update(preset=preset_name, config=asdict(p), methods=list(args.methods), phases=list(PHASES),
               timing={"warmup_steps_per_method": args.warmup, "repeats": args.repeats,
                       "statistic": "median over repeats; methods alternate, order reversed every other repeat",
                       "n": "timed steps per method: 'n' in every method's result"},
               standard_text_streams=C.STANDARD_TEXT_STREAMS,
               rollout=("skipped" if args.no_rollout else "timed per method" if args.rollout_per_method
                        else "timed once per repeat and counted in every method's step (identical work)"))
    ids_img = p.prompt_text + p.image_grid[0] * p.image_grid[1] // 4 + 2
    print(f"# step benchmark on {doc['device']['name']}: preset {preset_name}, batch {p.batch} x {p.response} "
          f"response tokens, prompt {ids_img} (with image) / {p.prompt_text} (text only) tokens, vocab {p.vocab}, "
          f"{p.dtype}", flush=True)

    t0 = time.perf_counter()
    student = build_model(p.student, p.student_vision, p.vocab, dtype, device, seed=args.seed)
    teacher = build_model(p.teacher, p.teacher_vision, p.vocab, dtype, device, seed=args.seed + 1).eval()
    teacher.requires_grad_(False)
    if p.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    batch = make_batch(p, device, dtype, seed=args.seed)
    doc["params"] = {"student": sum(x.numel() for x in student.parameters()),
                     "teacher": sum(x.numel() for x in teacher.parameters())}
    doc["build_s"] = time.perf_counter() - t0
    stepper = Stepper(student, teacher, opt, batch, p, device, rollout=not args.no_rollout)

    samples: dict[str, list[dict]] = {m: [] for m in args.methods}
    peak: dict[str, int] = {}
    for _ in range(args.warmup):
        shared = None if args.rollout_per_method else stepper.generate()
        for m in args.methods:
            stepper.step(m, rollout_s=shared)
    for rep in range(args.repeats):
        order = list(args.methods) if rep % 2 == 0 else list(reversed(args.methods))
        shared = None if args.rollout_per_method else stepper.generate()
        for m in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            samples[m].append(stepper.step(m, rollout_s=shared))
            if device.type == "cuda":
                peak[m] = max(peak.get(m, 0), torch.cuda.max_memory_allocated(device))
        print(f"  repeat {rep + 1}/{args.repeats}: " + "  ".join(
            f"{m} {C.fmt_time(samples[m][-1]['step'])}" for m in args.methods), flush=True)

    keys = (*PHASES, "non_generation", "step")
    results = {}
    for m, ss in samples.items():
        results[m] = {k: statistics.median(s[k] for s in ss) for k in keys}
        results[m]["n"] = len(ss)
        results[m]["samples"] = ss
        if m in peak:
            results[m]["peak_memory_bytes"] = peak[m]
    doc["results"] = results
    doc["ratios"] = {}
    doc["paired_ratios"] = {}
    for base in ("opd", "opd4"):
        if "vgs" in results and base in results:
            doc["ratios"][f"vgs_over_{base}"] = {
                k: (results["vgs"][k] / results[base][k] if results[base][k] > 0 else None) for k in keys
            }
            # Same repeat = same rollout and neighbouring moments: the per-repeat ratio cancels drift.
            doc["paired_ratios"][f"vgs_over_{base}"] = {
                k: statistics.median(v[k] / o[k] for v, o in zip(samples["vgs"], samples[base]) if o[k] > 0)
                if any(o[k] > 0 for o in samples[base]) else None
                for k in keys
            }
    doc["targets"] = []
    if "vgs_over_opd" in doc["ratios"]:
        for k in ("step", "non_generation"):
            v = doc["paired_ratios"]["vgs_over_opd"][k]
            doc["targets"].append({"target": "vgs_step_over_opd", "part": k, "value": v, "bound": "<= 1.10",
                                   "met": bool(v is not None and v <= 1.10),
                                   "ratio_of_medians": doc["ratios"]["vgs_over_opd"][k],
                                   "n": min(len(samples["vgs"]), len(samples["opd"])),
                                   "statistic": "median over repeats of the per-repeat ratio"})
    doc["machine_state_end"] = C.machine_state()
    return doc


def print_tables(doc) -> str:
    res = doc["results"]
    keys = (*PHASES, "non_generation", "step")
    rows = [[m, *(C.fmt_time(res[m][k]) for k in keys), C.n_str(C.repeats_of(res[m])),
             C.fmt_bytes(res[m].get("peak_memory_bytes")) if "peak_memory_bytes" in res[m] else "-"] for m in res]
    out = [f"## Training step, median per phase over n timed steps ({doc['device']['name']}, preset "
           f"{doc['preset']}, batch {doc['config']['batch']} x {doc['config']['response']} tokens)",
           C.table(rows, ["method", *keys, "n", "peak mem"])]
    for name, rat in doc["ratios"].items():
        paired = doc["paired_ratios"][name]
        out.append(f"## {name.replace('_', ' ')}")
        n_pairs = min(C.repeats_of(res[m]) or 0 for m in name.split("_over_"))
        out.append(C.table([[k, C.fmt_ratio(v), f"{C.fmt_ratio(paired[k])} (n={n_pairs})"] for k, v in rat.items()],
                           ["part", "ratio of medians", "median of per-repeat ratios"]))
    if doc["targets"]:
        out.append("## Target: VGS step <= 1.10x the standard-OPD step (median of per-repeat ratios)")
        out.append(C.table([[t["part"], f"{t['value']:.3f}", f"{t['ratio_of_medians']:.3f}", C.n_str(t.get("n")),
                             t["bound"], "met" if t["met"] else "MISSED"] for t in doc["targets"]],
                           ["part", "vgs/opd", "(ratio of medians)", "n", "bound", "status"]))
    text = "\n\n".join(out)
    print(text, flush=True)
    return text


def plot(doc, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    res = doc["results"]
    methods = list(res)
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(methods)
    for ph in PHASES:
        vals = [res[m][ph] for m in methods]
        ax.bar(methods, vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("median seconds per step (phases stacked)")
    ax.set_title(f"{doc['device']['name']}, preset {doc['preset']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(C.REPO)) if path.is_relative_to(C.REPO) else str(path)


def check_config(preset: str) -> int:
    """Build the preset's models on the meta device (no memory, no weights) and print their sizes."""
    p = PRESETS[preset]
    for who, text, vision in (("student", p.student, p.student_vision), ("teacher", p.teacher, p.teacher_vision)):
        m = build_model(text, vision, p.vocab, getattr(torch, p.dtype), "meta", seed=0)
        n = sum(x.numel() for x in m.parameters())
        print(f"{preset} {who}: {n / 1e9:.2f} B parameters, hidden {text.hidden}, layers {text.layers}, "
              f"lm_head {tuple(m.lm_head.weight.shape)}, tied {m.lm_head.weight is m.get_input_embeddings().weight}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="CI-sized (preset 'quick', 1 warm-up, 2 repeats)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: qwen3vl-2b-8b on CUDA, tiny on CPU")
    p.add_argument("--batch", type=int)
    p.add_argument("--response", type=int, help="response tokens per prompt")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed steps per method (default 5 on CUDA, 7 on CPU, 2 with "
                   "--quick)")
    p.add_argument("--no-rollout", action="store_true", help="skip generation (rollout time 0)")
    p.add_argument("--rollout-per-method", action="store_true",
                   help="generate in every method's step (default: once per repeat, shared by the methods)")
    p.add_argument("--check-config", action="store_true", help="build the preset on 'meta' and exit")
    p.add_argument("--out-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--name", help="results file stem (default step[-<preset>]-<device>[-quick], the preset "
                   "named when it is not the device's default)")
    p.add_argument("--note", action="append")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else (5 if torch.cuda.is_available() else 7)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_config:
        return check_config(args.preset or "qwen3vl-2b-8b")
    t0 = time.perf_counter()
    doc = run(args)
    doc["total_wall_s"] = time.perf_counter() - t0
    default_preset = "quick" if args.quick else ("qwen3vl-2b-8b" if doc["device"]["type"] == "cuda" else "tiny")
    name = "step" if doc["preset"] == default_preset else f"step-{doc['preset']}"
    stem = args.name or f"{name}-{doc['device']['slug']}" + ("-quick" if args.quick else "")
    path = Path(args.out_dir) / f"{stem}.json"
    if not args.no_plots:
        pl = plot(doc, path.with_suffix(".png"))
        doc["plots"] = [pl] if pl else []
    doc["tables_markdown"] = print_tables(doc)
    C.write_json(path, doc)
    print(f"\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
