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
    """Rows of a JSONL file, checked at load time (errors name ``path:line`` and the field): each line a
    JSON object with string ``question`` and ``answer`` (a numeric answer is read as its text) and an
    ``image`` path to an existing file; relative paths resolve against ``image_root`` (default: the
    JSONL's folder). An optional ``response`` is a string."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object {{image, question, answer}}, "
                                 f"got {type(row).__name__} {_short(row)}")
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(f"{where}: row lacks {missing}; rows need keys {list(REQUIRED)}")
            img = row["image"]
            if not isinstance(img, str) or not img:
                raise ValueError(f"{where}: 'image' must be a path (a non-empty string), got {_short(img)}")
            if not os.path.isabs(img):
                img = os.path.join(root, img)
            if not os.path.isfile(img):
                how = "" if os.path.isabs(row["image"]) else f" (relative image paths resolve against {root})"
                raise ValueError(f"{where}: 'image' file not found: {img}{how}")
            response = row.get("response")
            if response is not None and not isinstance(response, str):
                raise ValueError(f"{where}: 'response' must be a string, got {_short(response)}")
            rows.append(Example(img, _text(row, "question", where), _text(row, "answer", where, numbers=True),
                                response))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _short(v, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def _text(row: dict, key: str, where: str, numbers: bool = False) -> str:
    """``row[key]`` as text: a string (or, with ``numbers``, a number's text); never ``None``."""
    v = row[key]
    if isinstance(v, str):
        return v
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise ValueError(f"{where}: {key!r} must be a string{' or a number' if numbers else ''}, got {_short(v)}")


def load_dataset_rows(spec: str, image_root: str = "") -> list[Example]:
    """``spec``: a JSONL path, or ``hf:NAME[:SPLIT]`` / a saved ``datasets`` folder with image/question/answer."""
    if spec.startswith("hf:") or (os.path.isdir(spec) and os.path.exists(os.path.join(spec, "dataset_info.json"))):
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(
                f"data spec {spec!r} needs the `datasets` package: pip install datasets"
            ) from exc

        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        else:
            ds = datasets.load_from_disk(spec)
        missing = [k for k in REQUIRED if k not in ds.column_names]
        if missing:
            raise ValueError(f"dataset {spec!r} lacks columns {missing}; it needs {list(REQUIRED)}")
        rows = []
        for i, r in enumerate(ds):
            where = f"dataset {spec!r} row {i}"
            if r["image"] is None:
                raise ValueError(f"{where}: 'image' is null")
            rows.append(Example(r["image"], _text(r, "question", where), _text(r, "answer", where, numbers=True),
                                r.get("response")))
        return rows
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data file {spec!r} does not exist")
    if os.path.isdir(spec):
        raise IsADirectoryError(f"data {spec!r} is a folder but not a saved `datasets` dataset "
                                "(no dataset_info.json); pass a JSONL file")
    return load_jsonl(spec, image_root)


def load_image(image):
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, dict) and "path" in image:  # datasets Image feature undecoded
        return load_image(image["path"])
    return image.convert("RGB")


def image_size(image) -> tuple[int, int]:
    """(width, height) of an image path, ``datasets`` image dict or PIL image; a path's header only."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as im:
            return im.size
    if isinstance(image, dict) and "path" in image:
        return image_size(image["path"])
    return image.size


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
