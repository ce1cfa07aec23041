"""The study (``vgs_train.tools.study``): its statistics, the conclusions it lets the README state, and a tiny run on
both instruction-set settings whose results are cached."""

import json
import math

import pytest
from train_helpers import TINY

from vgs_train.tools import study
from vgs_train.tools.stats import accuracy_se, covers_zero, mean_ci, paired_diff, prediction_interval, t975


def test_t_quantiles_and_intervals():
    assert t975(1) == pytest.approx(12.706, abs=1e-3) and t975(7) == pytest.approx(2.3646, abs=1e-4)
    assert t975(40) == pytest.approx(2.0211, abs=1e-3) and t975(120) == pytest.approx(1.9799, abs=1e-3)
    s = mean_ci([0.70, 0.74, 0.78, 0.82])
    sd = math.sqrt(sum((x - 0.76) ** 2 for x in [0.70, 0.74, 0.78, 0.82]) / 3)
    assert s["mean"] == pytest.approx(0.76) and s["sd"] == pytest.approx(sd)
    assert s["ci95"] == pytest.approx([0.76 - 3.1824 * sd / 2, 0.76 + 3.1824 * sd / 2], abs=1e-6)
    lo, hi = prediction_interval([0.70, 0.74, 0.78, 0.82])
    assert hi - lo == pytest.approx(2 * 3.1824 * sd * math.sqrt(1.25), abs=1e-6)
    d = paired_diff({0: 0.8, 1: 0.7, 2: 0.9, 5: 0.1}, {0: 0.7, 1: 0.6, 2: 0.85})
    assert d["keys"] == [0, 1, 2] and d["mean"] == pytest.approx((0.1 + 0.1 + 0.05) / 3)
    assert covers_zero([-0.1, 0.2]) and not covers_zero([0.01, 0.2]) and not covers_zero([-0.3, -0.01])
    assert accuracy_se(0.44, 200) == pytest.approx(0.0351, abs=1e-4)
    with pytest.raises(ValueError):
        mean_ci([])
    # a share of 0/1 outcomes: the t interval reaches past [0, 1]; clipped to the range, the mean unchanged
    lumpy = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    raw, clipped = mean_ci(lumpy), mean_ci(lumpy, (0.0, 1.0))
    assert raw["ci95"][0] < 0 and clipped["ci95"][0] == 0.0 and clipped["ci95"][1] == raw["ci95"][1] < 1
    assert clipped["mean"] == raw["mean"] == 0.25
    assert prediction_interval(lumpy, (0.0, 1.0))[0] == 0.0
    assert paired_diff({0: 1.0, 1: 1.0, 2: 0.9}, {0: 0.0, 1: 0.0, 2: 0.0}, (-1.0, 1.0))["ci95"][1] <= 1.0


def _arm(name, setting, method="vgs", diff=(0.0, -0.01, 0.01), own=(1.0, 1.0, 1.0), own_diff=(0.0, -0.1, 0.1),
         collapsed=0):
    return {"arm": name, "label": name.upper(), "setting": setting, "method": method, "lr": 1e-3,
            "paired_with": "OPD", "n_seeds": 8, "diff_vs_opd_mean": diff[0], "diff_vs_opd_ci95": list(diff[1:]),
            "own_phrasing_share_mean": own[0], "own_phrasing_share_ci95": list(own[1:]),
            "own_phrasing_diff_vs_opd_mean": own_diff[0], "own_phrasing_diff_vs_opd_ci95": list(own_diff[1:]),
            "collapsed": collapsed}


def test_a_difference_is_stated_only_when_every_setting_excludes_zero_the_same_way():
    arms = [_arm("opd", s, method="opd") for s in ("default", "avx2")]
    arms += [_arm("up", "default", diff=(0.05, 0.02, 0.08)), _arm("up", "avx2", diff=(0.04, 0.01, 0.07))]
    arms += [_arm("half", "default", diff=(0.05, 0.02, 0.08)), _arm("half", "avx2", diff=(0.02, -0.01, 0.05))]
    arms += [_arm("flip", "default", diff=(0.05, 0.02, 0.08)), _arm("flip", "avx2", diff=(-0.05, -0.08, -0.02))]
    arms += [_arm("down", "default", diff=(-0.3, -0.4, -0.2), collapsed=3),
             _arm("down", "avx2", diff=(-0.2, -0.3, -0.1), collapsed=2)]
    text = study.conclusions({"arms": arms})
    acc = {ln.split(":")[0]: ln for ln in text if "acc@1" in ln}
    assert "higher than OPD under both settings" in acc["UP"]
    assert "not shown to differ" in acc["HALF"] and "not shown to differ" in acc["FLIP"]
    assert "lower than OPD under both settings" in acc["DOWN"]
    assert any(ln.startswith("DOWN: collapsed runs 3/8") for ln in text)
    assert not any(ln.startswith("UP: collapsed") for ln in text)
    for ln in text:  # never a difference without its intervals
        if "higher" in ln or "lower" in ln:
            assert "95 % CI" in ln


def test_study_runs_both_settings_and_reuses_cached_runs(tmp_path, embedded_cache):
    out, js = tmp_path / "study", tmp_path / "study.json"
    args = ["--out", str(out), "--json", str(js), "--seeds", "2", "--steps", "2", "--arms", "vgs-alpha2",
            "--eval-rows", "4", "--workers", "2"] + TINY + [f"embedded.cache_dir={embedded_cache}"]
    assert study.main(args) == 0
    res = json.loads(js.read_text())
    assert {(a["arm"], a["setting"]) for a in res["arms"]} == {(n, s) for n in ("opd", "vgs-alpha2")
                                                             for s in ("default", "avx2")}
    for a in res["arms"]:
        for key in ("method", "alpha", "beta", "lr", "n_seeds", "acc_mean", "acc_ci95", "diff_vs_opd_mean",
                    "diff_vs_opd_ci95", "own_phrasing_share_mean", "collapsed"):
            assert key in a, key
        assert a["n_seeds"] == 2 and a["beta"] == 0.01 and a["lr"] == 1e-3
    # each setting's runs really ran on that code path (the workers check it; the result records it)
    for setting, cap in (("default", None), ("avx2", "AVX2")):
        r = json.loads((out / setting / "vgs-alpha2-seed1" / "result.json").read_text())
        assert r["setting"] == setting and (cap is None or r["machine"]["cpu_capability"] == cap)
        assert res["references"][setting]["machine"]["cpu_capability"] == r["machine"]["cpu_capability"]
    assert res["conclusions"] and any("VGS (alpha 2)" in c for c in res["conclusions"])
    # a second call reruns nothing: the cached results are read back (their files stay untouched)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    assert len(stamps) == 8
    assert study.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    assert json.loads(js.read_text())["arms"] == res["arms"]
    # the README section is generated from study.json, between the markers only
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- study:start -->\nold\n<!-- study:end -->\nb\n")
    assert study.main(["--report", str(js), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("a\n") and text.endswith("b\n") and "\nold\n" not in text and "| VGS (alpha 2) |" in text


def test_study_refuses_unknown_arms_and_settings(capsys):
    for bad in (["--arms", "vgs-alpha7"], ["--settings", "avx1024"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            study.main(bad)
        assert "error" in capsys.readouterr().err
