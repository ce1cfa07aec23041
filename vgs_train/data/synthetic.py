"""A synthetic, visually grounded task: small PNG images of one large coloured shape, with questions about
its colour or its shape, whose answers need the image. Written as JSONL + PNGs so it goes through the
same loader as real data.

The reference response describes the object inside ``<reason>...</reason>`` and then gives the answer,
e.g. ``<reason>I see a red circle.</reason>red``. A model that cannot see is at chance: 1/4 for colour
questions, 1/3 for shape questions (0.29 on average).

The shape is large and spans most of the image's visual tokens (a 96 x 96 image is 9 tokens after the
2 x 2 patch merge), so a tiny model trained from scratch learns to look at the image within a few
hundred CPU steps.
"""

from __future__ import annotations

import json
import os
import random

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "Which shape is in the image?"}
QUESTION_TYPES = tuple(QUESTIONS)


def _draw(img, shape: str, colour: str, rng: random.Random) -> None:
    from PIL import ImageDraw

    size = img.size[0]
    s = int(size * rng.uniform(0.55, 0.8))
    ox = rng.randint(1, size - s - 1)
    oy = rng.randint(1, size - s - 1)
    d = ImageDraw.Draw(img)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    if shape == "circle":
        d.ellipse([ox, oy, ox + s, oy + s], fill=fill)
    elif shape == "square":
        d.rectangle([ox, oy, ox + s, oy + s], fill=fill)
    else:
        d.polygon([(ox + s / 2, oy), (ox, oy + s), (ox + s, oy + s)], fill=fill)


# Two phrasings of the same reasoning: the student's own habit and the teacher's. The embedded default trains
# each model on its own phrasing (the teacher sees the student's now and then), so a student distilled from the
# teacher can keep or lose its own phrasing: the demo measures which (``phrasing``).
PHRASINGS = {"student": "I see a {colour} {shape}.", "teacher": "The picture shows a {colour} {shape}."}


def describe(shape: str, colour: str, phrasing: str = "student") -> str:
    return PHRASINGS[phrasing].format(colour=colour, shape=shape)


def rephrase(response: str, phrasing: str) -> str:
    """A reference response (student phrasing) in ``phrasing``."""
    head = PHRASINGS["student"].split("{")[0]
    if phrasing == "student" or head not in response:
        return response
    return response.replace(head, PHRASINGS[phrasing].split("{")[0], 1)


def phrasing_of(completion: str) -> str:
    """Which phrasing a completion's reasoning starts with: "student", "teacher" or "other"."""
    body = completion.split("<reason>", 1)[1] if "<reason>" in completion else completion
    body = body.lstrip()
    for name, template in PHRASINGS.items():
        if body.startswith(template.split("{")[0].strip()):
            return name
    return "other"


def make_example(rng: random.Random, size: int = 96):
    """One (PIL image, question, answer, reasoning) sample."""
    from PIL import Image

    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    img = Image.new("RGB", (size, size), (245, 245, 245))
    _draw(img, shape, colour, rng)
    if rng.random() < 0.5:
        question, answer = QUESTIONS["colour"], colour
    else:
        question, answer = QUESTIONS["shape"], shape
    return img, question, answer, describe(shape, colour)


def question_type(question: str) -> str:
    """"colour" or "shape" for one of the task's questions (ValueError for any other text)."""
    for kind, text in QUESTIONS.items():
        if question == text:
            return kind
    raise ValueError(f"not a question of the synthetic task: {question!r}")


def reference_response(reasoning: str, answer: str) -> str:
    return f"<reason>{reasoning}</reason>{answer}"


def write_task(out_dir: str, n: int, seed: int, size: int = 96, name: str = "train") -> str:
    """Write ``n`` samples as ``out_dir/name.jsonl`` + ``out_dir/images/name_*.png``; returns the JSONL path.

    Rows: {"image": relative path, "question", "answer", "response"} (``response`` = the reference
    reasoning + answer, used only by the embedded SFT warm-up)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(n):
            img, q, a, reasoning = make_example(rng, size)
            rel = os.path.join("images", f"{name}_{i:05d}.png")
            img.save(os.path.join(out_dir, rel))
            f.write(json.dumps({"image": rel, "question": q, "answer": a,
                                "response": reference_response(reasoning, a)}) + "\n")
    os.replace(tmp, path)
    return path


def corpus() -> list[str]:
    """Every string the task can produce (for the task-restricted tokenizer)."""
    texts = [*QUESTIONS.values(), "0 1 2 3 4 5 6 7 8 9",
             "<reason></reason>"]
    for s in SHAPES:
        for c in COLOURS:
            for ph in PHRASINGS:
                texts += [reference_response(describe(s, c, ph), c), reference_response(describe(s, c, ph), s)]
    return texts
