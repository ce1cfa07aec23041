"""The embedded default: a synthetic visually grounded task, an offline Qwen tokenizer and tiny
Qwen3-VL teacher/student, prepared once (teacher SFT, student warm-up) and cached on disk. Everything
is saved with ``save_pretrained`` and the trainer loads it by path like any HF model.

The teacher and the student of the default settings ship with the package (``vgs_train/prepared``, a few MB
of safetensors with a manifest of their hashes): preparation trains in floating point, and ATen, MKL and
oneDNN pick AVX-512 or AVX2 code paths by CPU, so two machines prepare different models from the same
settings (single-threaded and deterministic or not). With the shipped files every machine starts from the
same models. Other ``embedded`` settings (or ``embedded.shipped=false``) prepare locally as before;
``python -m vgs_train.loops.embedded --write-shipped DIR`` rebuilds the shipped files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time

import torch

from ..config import TrainConfig, to_dict
from ..data import synthetic
from ..data.examples import Sampler, load_jsonl
from ..data.rng import fork_rng
from ..pipeline.views import REASONING_SYSTEM_PROMPT, PromptBuilder, append_completion, response_hidden

PREP_VERSION = 4
PREP_THREADS = 1  # preparation runs single-threaded whatever the machine (see ``deterministic``)
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prepared")
MODELS = ("teacher", "student")


def build_tokenizer(vocab: str):
    from ..data.tokenizer import build_qwen_tokenizer

    if vocab == "full":
        return build_qwen_tokenizer("full")
    texts = synthetic.corpus() + [REASONING_SYSTEM_PROMPT, "system\nuser\nassistant\n", "\n\n"]
    return build_qwen_tokenizer("task", texts)


def encode_targets(tokenizer, texts: list[str]):
    """Reference responses + <|im_end|>, right-padded: (ids [B, T], mask [B, T])."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return ids, mask


def sft(model, processor, examples, *, steps: int, lr: float, batch_size: int, seed: int,
        text_fraction: float = 0.0, phrasing: str = "student", phrasing_mix: float = 0.0,
        log_every: int = 50, desc: str = "sft") -> list[float]:
    """Supervised warm-up on the reference responses, cross-entropy on response tokens, AdamW with linear
    warm-up and cosine decay. Returns the loss per step.

    Each step's batch is split: a ``text_fraction`` share of its rows are trained on the text-only view
    (the same question without the image: the model learns the language prior, guessing what it cannot
    see), the rest on the image view. Responses are in ``phrasing`` (:data:`synthetic.PHRASINGS`), each row
    in the other phrasing with probability ``phrasing_mix``."""
    builder = PromptBuilder(processor)
    tok = builder.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    sampler = Sampler(len(examples), seed)
    other = "teacher" if phrasing == "student" else "student"
    rng = random.Random(seed)
    n_text = round(batch_size * text_fraction)
    model.train()
    losses = []
    t0 = time.time()
    with fork_rng():
        torch.manual_seed(seed)
        for step in range(steps):
            rows = [examples[i] for i in sampler.next(batch_size)]
            responses = [synthetic.rephrase(r.response, other if rng.random() < phrasing_mix else phrasing)
                         for r in rows]
            total, n_tok = 0.0, 0
            for view_rows, view_resp, with_image in ((rows[n_text:], responses[n_text:], True),
                                                     (rows[:n_text], responses[:n_text], False)):
                if not view_rows:
                    continue
                enc = builder.encode(view_rows, with_image=with_image)
                ids, mask = encode_targets(tok, view_resp)
                h = response_hidden(model, append_completion(enc, ids, mask), ids.shape[1])
                logits = model.get_output_embeddings()(h[mask]).float()
                total = total + torch.nn.functional.cross_entropy(logits, ids[mask], reduction="sum")
                n_tok += int(mask.sum())
            loss = total / n_tok
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                print(f"  [{desc}] step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return losses


def versions() -> dict:
    """Library versions that change what preparation builds (they are part of the cache key)."""
    import PIL
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "pillow": PIL.__version__}


@contextlib.contextmanager
def deterministic(threads: int = PREP_THREADS):
    """A fixed thread count and deterministic kernels: the same cache key builds the same models on any
    machine with these library versions (the thread count changes floating-point reduction order)."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


# The embedded settings each prepared stage depends on (its cache key covers these and the stages before it).
DATA_KEYS = ("n_train", "n_eval", "image_size", "task_seed")
MODEL_KEYS = {
    "teacher": ("tokenizer_vocab", "teacher", "teacher_sft_steps", "teacher_sft_lr", "teacher_sft_text_fraction",
                "teacher_phrasing_mix", "sft_batch_size", "sft_seed"),
    "student": ("tokenizer_vocab", "student", "student_sft_steps", "student_sft_lr", "student_sft_text_fraction",
                "sft_batch_size", "sft_seed"),
}


def stage_keys(cfg: TrainConfig, *, with_versions: bool = True) -> dict:
    """Cache keys of the three prepared stages: the task data, the teacher and the student. Each covers the
    settings it is built from, the stages it reads, the preparation code's version and (``with_versions``)
    the library versions (another torch / transformers / pillow may build other models from the same
    settings). Without the versions: the recipe keys the shipped models are matched by."""
    e = to_dict(cfg.embedded)
    extra = {"versions": versions(), "threads": PREP_THREADS} if with_versions else {}

    def key(name, fields, parent=""):
        blob = json.dumps({"v": PREP_VERSION, "stage": name, "parent": parent, **extra,
                           **{f: e[f] for f in fields}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    data = key("data", DATA_KEYS)
    return {"data": data, **{m: key(m, fields, data) for m, fields in MODEL_KEYS.items()}}


def resolve_paths(cfg: TrainConfig, verbose: bool = True) -> dict:
    """Model and data paths of a config: {"student", "teacher", "train", "eval"}, preparing the embedded
    default (or reusing its cache) where the config asks for it ("tiny" / "synthetic")."""
    need = "tiny" in (cfg.model.student, cfg.model.teacher) or "synthetic" in (cfg.data.train, cfg.data.eval)
    emb = prepare_embedded(cfg, verbose=verbose) if need else None

    def pick(value, key):
        return emb[key] if value in ("tiny", "synthetic") else value

    return {"student": pick(cfg.model.student, "student"), "teacher": pick(cfg.model.teacher, "teacher"),
            "train": pick(cfg.data.train, "train"), "eval": pick(cfg.data.eval, "eval") if cfg.data.eval else ""}


# ---------------------------------------------------------------------------- the shipped models
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(shipped_dir: str = SHIPPED_DIR) -> dict | None:
    path = os.path.join(shipped_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verify_shipped(shipped_dir: str = SHIPPED_DIR) -> dict:
    """The manifest of the shipped models after checking every listed file's SHA-256 (a truncated download or
    a Git LFS pointer fails here, naming the file)."""
    manifest = read_manifest(shipped_dir)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {shipped_dir}")
    for rel, digest in manifest["files"].items():
        path = os.path.join(shipped_dir, rel)
        if not os.path.exists(path):
            raise FileNotFoundError(f"shipped model file missing: {path}")
        if _sha256(path) != digest:
            raise RuntimeError(f"shipped model file {path} does not match its SHA-256 in manifest.json (a Git LFS "
                               "pointer or a damaged copy?); reinstall the package, or set embedded.shipped=false "
                               "to prepare the models locally")
    return manifest


def shipped_paths(cfg: TrainConfig, shipped_dir: str = SHIPPED_DIR) -> dict:
    """{model: folder} of the shipped models whose recipe equals this config's (none with
    ``embedded.shipped=false``, or when the settings differ from those the models were prepared with)."""
    manifest = read_manifest(shipped_dir) if cfg.embedded.shipped else None
    if manifest is None:
        return {}
    recipe = stage_keys(cfg, with_versions=False)
    hits = {m: os.path.join(shipped_dir, m) for m in MODELS if manifest["recipe"].get(m) == recipe[m]}
    if hits:
        verify_shipped(shipped_dir)
    return hits


def pixels_sha256(data_dir: str) -> str:
    """SHA-256 over the task's JSONL rows and the decoded pixels of its images (not the PNG bytes: another
    zlib compresses the same pixels differently)."""
    from PIL import Image

    h = hashlib.sha256()
    for split in ("train", "eval"):
        with open(os.path.join(data_dir, f"{split}.jsonl"), "rb") as f:
            data = f.read()
        h.update(data)
        for line in data.decode().splitlines():
            with Image.open(os.path.join(data_dir, json.loads(line)["image"])) as img:
                h.update(img.tobytes())
    return h.hexdigest()


def write_shipped(cfg: TrainConfig, out_dir: str, *, cache_dir: str | None = None, workers: int = 2,
                  verbose: bool = True) -> dict:
    """Prepare the teacher and the student of ``cfg`` (in ``cache_dir``, reusing what it holds; default: a
    fresh temporary folder) and write them to ``out_dir`` with a manifest (recipe keys, file hashes, the
    data's pixel hash, the machine and library versions they were prepared with)."""
    import tempfile

    from .. import machine

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _with_embedded(cfg, cache_dir=os.path.abspath(cache_dir or tmp), shipped=False)
        paths = prepare_embedded(cfg, verbose=verbose, workers=workers)
        os.makedirs(out_dir, exist_ok=True)
        files = {}
        for m in MODELS:
            dst = os.path.join(out_dir, m)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(paths[m], dst)
            for name in sorted(os.listdir(dst)):
                if name != "prep.json":  # holds timings: informative, not part of the model
                    files[f"{m}/{name}"] = _sha256(os.path.join(dst, name))
        data_dir = os.path.dirname(paths["train"])
        manifest = {"recipe": stage_keys(cfg, with_versions=False),
                    "settings": to_dict(cfg.embedded) | {"cache_dir": "", "shipped": True},
                    "data_pixels_sha256": pixels_sha256(data_dir), "files": files,
                    "prepared_on": {**machine.describe(), "versions": versions()}}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def _with_embedded(cfg: TrainConfig, **changes) -> TrainConfig:
    import copy

    cfg = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(cfg.embedded, k, v)
    return cfg


def prepare_embedded(cfg: TrainConfig, verbose: bool = True, workers: int = 1,
                     shipped_dir: str = SHIPPED_DIR) -> dict:
    """Build (or reuse from the cache) the synthetic task, the SFT'd tiny teacher and the warmed-up tiny
    student, each stage cached on its own (changing the student's recipe does not retrain the teacher). A model
    whose settings are those of the shipped one is not prepared: its path is the shipped folder.
    ``workers`` = 2 trains teacher and student at once in two processes (the same models: each stage runs
    single-threaded either way). Returns paths: {"train", "eval", "teacher", "student"}."""
    e = cfg.embedded
    keys = stage_keys(cfg)
    cache = cfg.cache_dir()
    data_dir = os.path.join(cache, f"data-{keys['data']}")
    paths = {"train": os.path.join(data_dir, "train.jsonl"), "eval": os.path.join(data_dir, "eval.jsonl"),
             **{m: os.path.join(cache, f"{m}-{keys[m]}") for m in MODELS}}

    def write_data(tmp):
        synthetic.write_task(tmp, e.n_train, e.task_seed, e.image_size, "train")
        synthetic.write_task(tmp, e.n_eval, e.task_seed + 1, e.image_size, "eval")
        return {"n_train": e.n_train, "n_eval": e.n_eval, "pixels_sha256": pixels_sha256(tmp)}

    _cached_stage(data_dir, "task data", write_data, verbose)
    shipped = shipped_paths(cfg, shipped_dir)
    if shipped:
        _check_shipped_data(data_dir, read_manifest(shipped_dir))
        paths.update(shipped)
        if verbose:
            print(f"embedded default: the shipped {' and '.join(shipped)} ({shipped_dir})", flush=True)
    todo = [m for m in MODELS if m not in shipped and not _finished(paths[m])]
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(todo), mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(_model_stage, e, m, paths[m], paths["train"], verbose) for m in todo]:
                f.result()
    for m in MODELS:
        if m not in shipped:
            _model_stage(e, m, paths[m], paths["train"], verbose)
    return paths


def _check_shipped_data(data_dir: str, manifest: dict) -> None:
    """Warn when this machine's task data differs from the data the shipped models were prepared on."""
    with open(os.path.join(data_dir, "prep.json")) as f:
        here = json.load(f).get("pixels_sha256")
    if here is None:  # a data stage cached by an older version: hash it now
        here = pixels_sha256(data_dir)
    if here != manifest["data_pixels_sha256"]:
        import warnings

        warnings.warn(f"the task data in {data_dir} differs from the data the shipped models were prepared on "
                      f"(pillow {versions()['pillow']} here, {manifest['prepared_on']['versions']['pillow']} "
                      "there): evaluation numbers are not comparable with the published ones", stacklevel=3)


def _model_stage(e, name: str, path: str, train_path: str, verbose: bool) -> None:
    _cached_stage(path, name, lambda tmp: _train_model(e, name, train_path, tmp, verbose), verbose)


def _finished(path: str) -> bool:
    return os.path.exists(os.path.join(path, "prep.json"))


def _cached_stage(path: str, what: str, build, verbose: bool) -> None:
    """Run ``build(tmp_dir) -> info`` unless ``path`` holds a finished stage; written to a temporary folder
    and renamed, so an interrupted preparation leaves nothing half-built behind."""
    if _finished(path):
        if verbose:
            print(f"embedded default: reusing the cached {what} in {path}", flush=True)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _remove_stale_tmp(path)
    tmp = path + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.time()
    if verbose:
        print(f"embedded default: preparing the {what} in {path}", flush=True)
    try:
        with deterministic():
            info = build(tmp)
        info.update(time_s=time.time() - t0, versions=versions(), threads=PREP_THREADS)
        with open(os.path.join(tmp, "prep.json"), "w") as f:
            json.dump(info, f)
        try:
            os.replace(tmp, path)
        except OSError:
            if not _finished(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same stage first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"embedded default: {what} prepared in {time.time() - t0:.0f}s", flush=True)


def _remove_stale_tmp(path: str) -> None:
    """Remove ``path.tmp<pid>`` folders left by preparations that were killed (their process is gone)."""
    parent, base = os.path.split(path)
    for name in os.listdir(parent):
        pid = name[len(base) + 4:] if name.startswith(base + ".tmp") else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train_model(e, name: str, train_path: str, out: str, verbose: bool) -> dict:
    """SFT one tiny model (``name``: teacher or student) on the task's training rows; saved to ``out``."""
    from ..models.tiny import build_processor, build_tiny_model

    tok = build_tokenizer(e.tokenizer_vocab)
    proc = build_processor(tok, min_pixels=32 * 32, max_pixels=max(e.image_size, 32) ** 2)
    train = load_jsonl(train_path)
    teacher = name == "teacher"
    steps = e.teacher_sft_steps if teacher else e.student_sft_steps
    seed = e.sft_seed + (0 if teacher else 1)
    model = build_tiny_model(e.teacher if teacher else e.student, tok, seed=seed)
    losses = sft(model, proc, train, steps=steps, lr=e.teacher_sft_lr if teacher else e.student_sft_lr,
                 batch_size=e.sft_batch_size, seed=seed,
                 text_fraction=e.teacher_sft_text_fraction if teacher else e.student_sft_text_fraction,
                 phrasing=name, phrasing_mix=e.teacher_phrasing_mix if teacher else 0.0,
                 log_every=max(steps // 4, 1) if verbose else 0, desc=f"{name} sft")
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return {"tokenizer_ids": len(tok), "sft_losses": losses, "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    import argparse

    from ..config import load_config

    p = argparse.ArgumentParser(prog="python -m vgs_train.loops.embedded", description="Prepare the embedded default's "
                                "teacher and student (SFT on the synthetic task) and write them as the shipped "
                                "models with their manifest.")
    p.add_argument("--write-shipped", metavar="DIR", required=True,
                   help=f"output folder (the package's own: {os.path.relpath(SHIPPED_DIR)})")
    p.add_argument("--cache", metavar="DIR", help="preparation cache to reuse (default: a fresh temporary one)")
    p.add_argument("--workers", type=int, default=2, help="prepare teacher and student in parallel processes")
    p.add_argument("overrides", nargs="*", help="embedded.* settings (key=value); the defaults are what ships")
    args = p.parse_args(argv)
    manifest = write_shipped(load_config(None, args.overrides), args.write_shipped, cache_dir=args.cache,
                             workers=args.workers)
    print(json.dumps({k: manifest[k] for k in ("recipe", "prepared_on")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
