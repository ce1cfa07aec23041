"""``make demo`` (``vgs_train.demo``) on tiny settings: results.json, the table, the README section, and the
same numbers whether a run trains in a worker process or inline."""

import json
import os

from train_helpers import TINY

from vgs_train import demo


def test_demo_writes_results_and_runs_are_reproducible_across_workers(tmp_path):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--steps", "2", "--seeds", "1", "--alphas", "2", "--eval-rows", "4",
            "--workers", "2"] + TINY + [f"embedded.cache_dir={tmp_path / 'cache'}", "run.tensorboard=false"]
    assert demo.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["teacher_acc"] <= 1.0 and 0.0 <= res["initial_acc"] <= 1.0
    assert [(r["method"], r["alpha"], r["seed"]) for r in res["runs"]] == [("opd", None, 0), ("vgs", 2.0, 0)]
    for r in res["runs"]:
        assert isinstance(r["collapsed"], bool) and 0.0 <= r["acc"] <= 1.0 and len(r["history"]) == 2
        assert set(r["flags_at_end"]) == {"acc_drop", "truncated", "std_rise", "prior_gap"}
    assert (out / "curves.png").stat().st_size > 0 and (out / "table.txt").read_text().startswith("model")

    # the same job inline (one process, as with --workers 1) gives the same numbers as in the worker
    opd = res["runs"][0]
    job = {"name": opd["name"], "method": "opd", "alpha": None, "seed": 0, "eval_rows": 4, "initial_acc": 0.0,
           "overrides": res["settings"]["overrides"] + ["loss.method=opd", "run.seed=0",
                                                        f"run.out_dir={tmp_path / 'inline'}"]}
    inline = demo.train_run(job)
    for k in ("acc", "std", "vis", "lang", "own_phrasing"):
        assert inline[k] == opd[k], k
    assert [m["loss"] for m in inline["history"]] == [m["loss"] for m in opd["history"]]

    # the README section is generated from results.json, between the markers only
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo:start -->\nold\n<!-- demo:end -->\noutro\n")
    assert demo.main(["--report", str(out / "results.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "\nold\n" not in text
    assert "| OPD mean |" in text and "closed (mean over seeds)" in text
    assert os.path.exists(out / "opd-seed0" / "metrics.jsonl")
