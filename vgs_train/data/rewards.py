"""Verifiable rewards for GRPO: a reward function maps ``(completion_text, answer) -> float``.

Built in:

* ``exact_match`` (default): 1.0 when the extracted final answer (the text after the last ``</reason>``,
  an optional ``\\boxed{}`` unwrapped, punctuation and case normalised; see ``answers.extract_answer``)
  equals the normalised reference answer, else 0.0.
* ``format_exact_match``: 0.9 * exact_match + 0.1 when the completion has the ``<reason>...</reason>``
  format (a small shaping bonus for following the reasoning template).

Any other function plugs in by import path, ``"package.module:function"`` (config ``grpo.reward``), or
by passing a callable to :func:`get_reward_fn`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from .answers import extract_answer, is_correct, normalize

RewardFn = Callable[[str, str], float]

_FORMAT = re.compile(r"<reason>.*?</reason>\s*\S", re.DOTALL)


def exact_match(completion: str, answer: str) -> float:
    return 1.0 if is_correct(completion, answer) else 0.0


def has_reason_format(completion: str) -> bool:
    return bool(_FORMAT.search(re.sub(r"<\|[^|]*\|>", "", completion)))


def format_exact_match(completion: str, answer: str) -> float:
    return 0.9 * exact_match(completion, answer) + (0.1 if has_reason_format(completion) else 0.0)


REWARDS: dict[str, RewardFn] = {"exact_match": exact_match, "format_exact_match": format_exact_match}


def get_reward_fn(spec: str | RewardFn) -> RewardFn:
    """A registered name, ``"module:function"``, or a callable (returned as is)."""
    if callable(spec):
        return spec
    if spec in REWARDS:
        return REWARDS[spec]
    if isinstance(spec, str) and ":" in spec:
        mod, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"grpo.reward={spec!r}: cannot import {name!r} from {mod!r} ({e})") from None
        if not callable(fn):
            raise ValueError(f"grpo.reward={spec!r} is not callable")
        return fn
    raise ValueError(f"grpo.reward must be one of {sorted(REWARDS)} or 'module:function', got {spec!r}")


def score(reward_fn: RewardFn, texts: list[str], answers: list[str]) -> tuple[list[float], list[bool]]:
    """Rewards and exact-match correctness (for the accuracy log) of each completion."""
    rewards = [float(reward_fn(t, a)) for t, a in zip(texts, answers)]
    correct = [extract_answer(t) == normalize(a) for t, a in zip(texts, answers)]
    return rewards, correct
