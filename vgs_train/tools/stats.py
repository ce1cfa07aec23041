"""Means with 95 % confidence intervals over seeds (Student's t), paired differences, and the standard error
of an accuracy: what every comparison the demo and the study state is computed with."""

from __future__ import annotations

import math
from statistics import NormalDist

# two-sided 95 % quantiles of Student's t, t_{0.975, df}, df = 1 .. 30
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """t_{0.975, df}: the table up to 30 degrees of freedom, the Cornish-Fisher expansion beyond (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(xs: list[float], bounds: tuple[float, float] | None = None) -> dict:
    """{"mean", "ci95": [lo, hi], "sd", "n"} of ``xs`` (t interval; with one value the interval is NaN).
    ``bounds``: the range the quantity lives in (an accuracy's [0, 1]); the interval is clipped to it (a t
    interval of bounded, lumpy values such as 0/1 outcomes can reach past the range, where the mean cannot)."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    m = sum(xs) / n
    if n == 1:
        return {"mean": m, "ci95": [math.nan, math.nan], "sd": math.nan, "n": 1}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "ci95": _clip([m - half, m + half], bounds), "sd": sd, "n": n}


def prediction_interval(xs: list[float], bounds: tuple[float, float] | None = None) -> list[float]:
    """95 % interval for one more run drawn like ``xs``: mean +- t * sd * sqrt(1 + 1/n) (clipped to ``bounds``)."""
    s = mean_ci(xs)
    n = s["n"]
    if n < 2:
        return [math.nan, math.nan]
    half = t975(n - 1) * s["sd"] * math.sqrt(1 + 1 / n)
    return _clip([s["mean"] - half, s["mean"] + half], bounds)


def paired_diff(a: dict, b: dict, bounds: tuple[float, float] | None = None) -> dict:
    """``a - b`` over the keys (seeds) both have: mean_ci of the per-key differences (clipped to ``bounds``),
    plus "keys"."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("paired_diff: no key in common")
    return {**mean_ci([a[k] - b[k] for k in keys], bounds), "keys": keys}


def _clip(ci: list[float], bounds: tuple[float, float] | None) -> list[float]:
    if bounds is None:
        return ci
    lo, hi = bounds
    return [min(max(x, lo), hi) if x == x else x for x in ci]


def covers_zero(ci: list[float]) -> bool:
    lo, hi = ci
    return not (lo > 0 or hi < 0)  # NaN bounds count as covering


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` questions."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))
