"""``make demo`` (``vgs_train.tools.demo``) on tiny settings: results.json, the table, the README section, and the
same numbers whether a run trains in a worker process or inline."""

import json
import os

from train_helpers import TINY

from vgs_train.tools import demo, demo_report, jobs, study


def test_demo_writes_results_and_runs_are_reproducible_across_workers(tmp_path, embedded_cache):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--steps", "2", "--seeds", "1", "--alphas", "2", "--eval-rows", "4",
            "--workers", "2", "--study", str(tmp_path / "none.json")] + TINY + [f"embedded.cache_dir={embedded_cache}"]
    assert demo.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["teacher_acc"] <= 1.0 and 0.0 <= res["initial_acc"] <= 1.0
    assert [(r["method"], r["alpha"], r["seed"]) for r in res["runs"]] == [("opd", None, 0), ("vgs", 2.0, 0)]
    for r in res["runs"]:
        for key in ("acc", "acc_sampled", "acc_text", "own_phrasing_share", "own_phrasing_pref"):
            assert 0.0 <= r[key] <= 1.0, key
        assert set(r["acc_by_type"]) == {"colour", "shape"}
        assert isinstance(r["collapsed"], bool) and isinstance(r["no_gain"], bool) and len(r["history"]) == 2
        assert set(r["flags_ever"]) == {"acc_drop", "truncated", "std_rise", "prior_gap"}
    assert (out / "curves.png").stat().st_size > 0 and (out / "table.txt").read_text().startswith("model")

    # the same job inline (one process, as with --workers 1) gives the same numbers as in the worker
    opd = res["runs"][0]
    job = study.train_job(str(tmp_path / "inline"), "default", study.OPD, 0, TINY + [
        f"embedded.cache_dir={embedded_cache}"], 4, "", steps=2, cache=False)
    inline = jobs.train_run({**job, "setting": "default"})
    for k in ("acc", "acc_sampled", "acc_text", "std", "vis", "lang", "own_phrasing_share", "own_phrasing_pref"):
        assert inline[k] == opd[k], k
    assert [m["loss"] for m in inline["history"]] == [m["loss"] for m in opd["history"]]

    # the README section is generated from results.json, between the markers only
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo:start -->\nold\n<!-- demo:end -->\noutro\n")
    assert demo.main(["--report", str(out / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "\nold\n" not in text
    assert "| OPD mean |" in text
    assert os.path.exists(out / "opd-seed0" / "metrics.jsonl")


def test_demo_runs_are_checked_against_the_study():
    res = {"means": [{"arm": "opd", "label": "OPD"}],
           "runs": [{"arm": "opd", "acc": 0.70}, {"arm": "opd", "acc": 0.95}]}
    st = {"arms": [{"arm": "opd", "setting": "default", "acc_mean": 0.75, "acc_ci95": [0.72, 0.78],
                    "acc_pred95": [0.65, 0.85], "n_seeds": 8},
                   {"arm": "opd", "setting": "avx2", "acc_mean": 0.2, "acc_ci95": [0.1, 0.3],
                    "acc_pred95": [0.0, 0.4], "n_seeds": 8}]}
    (c,) = demo_report.against_study(res, st)
    assert c["inside"] == [True, False] and c["study_acc_pred95"] == [0.65, 0.85]
    assert demo_report.against_study(res, None) == []
