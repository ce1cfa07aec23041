"""Answer matching for the reasoning format: the final answer after the last ``</reason>``, normalised."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[\s\.\,\!\?\:\;\"'`]+")


def extract_answer(text: str) -> str:
    """The text after the last ``</reason>`` (or the whole text without one), without special tokens,
    an optional \\boxed{}, surrounding punctuation and case."""
    text = re.sub(r"<\|[^|]*\|>", "", text)
    if "</reason>" in text:
        text = text.rsplit("</reason>", 1)[1]
    m = re.search(r"\\boxed\{([^}]*)\}", text)
    if m:
        text = m.group(1)
    return normalize(text)


def normalize(text: str) -> str:
    return _PUNCT.sub(" ", text).strip().lower()


def is_correct(completion_text: str, answer: str) -> bool:
    return extract_answer(completion_text) == normalize(answer)
