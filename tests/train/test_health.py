"""Training-health signals: the prior gap on a constructed batch and the collapse monitor."""

import math

import pytest
import torch

from vgs_kernels import vgs_loss
from vgs_train.config import HealthConfig
from vgs_train.pipeline.health import HealthMonitor, prior_gap, truncated_fraction


def _batch(degenerate_prior: bool, seed: int = 0):
    """Logits [B, T, V] where the teacher ignores the image on most tokens (q = q': VDS 0) and depends on it on
    a few (the answer tokens). The student's image view agrees with the teacher; its text-only view is either
    the teacher's text-only view plus small noise (a healthy language prior) or noise (a degenerate one)."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = 4, 12, 50
    zt = 4 * torch.randn(B, T, V, generator=g)
    ztp = zt.clone()
    ztp[:, -3:] = 4 * torch.randn(B, 3, V, generator=g)  # the image matters for the last 3 tokens
    zs = zt + 0.1 * torch.randn(B, T, V, generator=g)
    zsp = 4 * torch.randn(B, T, V, generator=g) if degenerate_prior else ztp + 0.1 * torch.randn(B, T, V, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    return zs, zsp, zt, ztp, mask


@pytest.mark.parametrize("degenerate", [False, True])
def test_prior_gap_warns_when_the_text_only_prior_degenerates_only(degenerate):
    healthy = prior_gap(*_per_token(False))
    gap = prior_gap(*_per_token(degenerate))
    zs, zsp, zt, ztp, mask = _batch(degenerate)
    out = vgs_loss(zs, zsp, zt, ztp, mask, return_per_token=True, backend="torch")
    low = mask & (out.per_token["gate"] == 0)
    # the gap is the mean language KL over the gated-out (low-VDS) tokens, computed independently here
    ref = torch.nn.functional.kl_div(torch.log_softmax(ztp, -1), torch.log_softmax(zsp, -1), log_target=True,
                                     reduction="none").sum(-1)
    assert gap == pytest.approx(float(ref[low].mean()), rel=1e-4)
    assert (gap > 5.0) if degenerate else (gap < 0.05)
    # a run that starts with a healthy prior and ends with this one: the gap is judged against the run's start
    monitor = HealthMonitor(HealthConfig(window=3))
    flags, raised = _run(monitor, [_m(gap=healthy)] * 3 + [_m(gap=gap)] * 3)
    assert flags["prior_gap"] is degenerate
    assert (len(raised) == 1 and "prior_gap" in raised[0]) if degenerate else raised == []


def _per_token(degenerate):
    zs, zsp, zt, ztp, mask = _batch(degenerate)
    return vgs_loss(zs, zsp, zt, ztp, mask, return_per_token=True, backend="torch").per_token, mask


def test_prior_gap_is_relative_to_the_runs_start_and_only_watched_where_r_is_built():
    # a 151k-vocabulary run starts with a large gap that stays put: no warning (a fixed 1-nat bar would fire)
    flags, raised = _run(HealthMonitor(HealthConfig(window=3)), [_m(gap=3.0)] * 3 + [_m(gap=3.2)] * 10)
    assert not flags["prior_gap"] and raised == []
    # the same rise warns a VGS run and never an OPD run (OPD does not build the visual target)
    rising = [_m(gap=0.4)] * 3 + [_m(gap=1.5)] * 5
    assert _run(HealthMonitor(HealthConfig(window=3)), rising)[0]["prior_gap"]
    flags, raised = _run(HealthMonitor(HealthConfig(window=3), watch_prior_gap=False), rising)
    assert not flags["prior_gap"] and raised == []


def _run(monitor, seq):
    flags, raised = None, []
    for m in seq:
        flags, w = monitor.update(m)
        raised += w
    return flags, raised


def _m(acc=0.6, trunc=0.0, std=1.0, gap=0.1):
    return {"rollout_acc": acc, "truncated": trunc, "std": std, "prior_gap": gap}


def test_collapse_signals_fire_on_a_collapsing_run_and_warn_once():
    monitor = HealthMonitor(HealthConfig(window=4))
    healthy = [_m(acc=0.6 + 0.01 * i, std=1.0 - 0.02 * i) for i in range(8)]
    flags, raised = _run(monitor, healthy)
    assert not any(flags.values()) and raised == []
    collapsing = [_m(acc=0.05, trunc=0.9, std=3.5) for _ in range(8)]
    flags, raised = _run(monitor, collapsing)
    assert flags == {"acc_drop": True, "truncated": True, "std_rise": True, "prior_gap": False}
    assert sorted(w.split("(")[1].split(")")[0] for w in raised) == ["acc_drop", "std_rise", "truncated"]


def test_a_run_that_climbs_then_falls_warns():
    # starts at 0.3, climbs to 0.8, falls back to 0.35: still above its start, far under its best
    climb = [_m(acc=0.3 + 0.05 * i) for i in range(11)] + [_m(acc=0.8)] * 10
    fall = [_m(acc=0.35)] * 10
    monitor = HealthMonitor(HealthConfig(window=5), warmup_steps=5)
    flags, raised = _run(monitor, climb)
    assert not any(flags.values()) and raised == []
    flags, raised = _run(monitor, fall)
    assert flags["acc_drop"] and [w for w in raised if "acc_drop" in w]


def test_a_healthy_run_with_a_warm_up_never_warns():
    # during the warm-up the student barely moves (low std KL to where it started, modest accuracy); after it
    # the std KL jumps while the student explores, then falls; accuracy climbs noisily: nothing is wrong
    warm = [_m(acc=0.45 + 0.03 * (i % 2), std=0.4, gap=0.4) for i in range(20)]
    after = [_m(acc=0.5 + 0.01 * i + 0.08 * (i % 3 == 0), std=1.2 - 0.003 * i, gap=0.4 - 0.001 * i)
             for i in range(100)]
    for watch in (True, False):  # a VGS run and an OPD run
        flags, raised = _run(HealthMonitor(HealthConfig(window=10), warmup_steps=20, watch_prior_gap=watch),
                             warm + after)
        assert not any(flags.values()) and raised == []
    # a baseline taken inside the warm-up reads the jump after it as a rise
    flags, raised = _run(HealthMonitor(HealthConfig(window=10), warmup_steps=0), warm + after)
    assert [w for w in raised if "std_rise" in w]


def test_monitor_state_round_trips_for_resume():
    a = HealthMonitor(HealthConfig(window=3))
    _run(a, [_m(acc=0.5)] * 3 + [_m(acc=0.4)] * 3 + [_m(acc=0.1)] * 2)
    b = HealthMonitor(HealthConfig(window=3))
    b.load_state_dict(a.state_dict())
    nxt = _m(acc=0.05)
    assert a.update(dict(nxt)) == b.update(dict(nxt))
    assert a.state_dict() == b.state_dict()


def test_nan_metrics_never_flag():
    monitor = HealthMonitor(HealthConfig(window=2))
    nan = float("nan")
    flags, raised = _run(monitor, [_m(acc=nan, trunc=nan, std=nan, gap=nan)] * 4)
    assert not any(flags.values()) and raised == []
    assert math.isnan(monitor.window_means()["std"])


def test_truncated_fraction_counts_completions_without_an_end_token():
    eos = [7, 9]
    completion = torch.tensor([[1, 2, 7, 0], [1, 2, 3, 4], [9, 0, 0, 0], [5, 5, 5, 5]])
    assert truncated_fraction(completion, eos) == 0.5
