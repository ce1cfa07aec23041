"""Data: JSONL rows ``{"image": path, "question": str, "answer": str}`` (the Vision-SR1-47K shape) or any
HF ``datasets`` dataset with those columns, plus a resumable, seeded sampler."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

REQUIRED = ("image", "question", "answer")


@dataclass
class Example:
    image: object  # a path (str) or a PIL image
    question: str
    answer: str
    response: str | None = None  # an optional reference response (used only by SFT warm-ups)


def load_jsonl(path: str, image_root: str = "") -> list[Example]:
    root = image_root or os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: row lacks {missing}; rows need keys {list(REQUIRED)}")
            img = row["image"]
            if isinstance(img, str) and not os.path.isabs(img):
                img = os.path.join(root, img)
            rows.append(Example(img, str(row["question"]), str(row["answer"]), row.get("response")))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_dataset_rows(spec: str, image_root: str = "") -> list[Example]:
    """``spec``: a JSONL path, or ``hf:NAME[:SPLIT]`` / a saved ``datasets`` folder with image/question/answer."""
    if spec.startswith("hf:") or (os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json"))):
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(
                f"data spec {spec!r} needs the `datasets` package: pip install 'vgs-kernels[datasets]'"
            ) from exc

        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        else:
            ds = datasets.load_from_disk(spec)
        missing = [k for k in REQUIRED if k not in ds.column_names]
        if missing:
            raise ValueError(f"dataset {spec!r} lacks columns {missing}; it needs {list(REQUIRED)}")
        return [Example(r["image"], str(r["question"]), str(r["answer"]), r.get("response")) for r in ds]
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data file {spec!r} does not exist")
    return load_jsonl(spec, image_root)


def load_image(image):
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, dict) and "path" in image:  # datasets Image feature undecoded
        return load_image(image["path"])
    return image.convert("RGB")


class Sampler:
    """Seeded epoch shuffling with a saveable position (epoch, index) for exact resume."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["n"] != self.n:
            raise ValueError(f"resume: the checkpoint's data has {sd['n']} rows, this run's has {self.n}")
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])
        self._order = self._make_order()
