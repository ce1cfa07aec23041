"""Gradient geometry per VDS decile (Sec. 3.2, Fig. 3): equal-frequency bins; angles in [0, 180] equal to
the arccos of cosines of gradients computed directly (hand-written KL terms, autograd); CLI smoke run."""

import csv
import json
import math
import os

import torch
from train_helpers import direct_terms, pipeline, sample, tiny_overrides

from vgs_train.cli import analyze_main as main
from vgs_train.pipeline.gradients import select_params
from vgs_train.tools.analyze import analyze_views, equal_frequency_bins, trend

# the last decoder layer and the final norm: a short backward keeps the test fast (the subset path)
SUBSET = r"language_model\.(layers\.1\.mlp|norm)"


def test_equal_frequency_bins():
    torch.manual_seed(0)
    v = torch.cat([torch.rand(60), torch.zeros(30), torch.full((13,), 0.5)])[torch.randperm(103)]
    b = equal_frequency_bins(v, 10)
    counts = torch.bincount(b, minlength=10)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    for k in range(9):  # bins are ordered by value
        assert v[b == k].max() <= v[b == k + 1].min()
    assert equal_frequency_bins(torch.arange(20.0), 10).tolist() == [i // 2 for i in range(20)]


def test_angles_match_direct_cosines(world):
    params = select_params(world["student"], SUBSET)
    batches = [sample(world, n=3, max_new_tokens=6, seed=11), sample(world, n=2, max_new_tokens=6, seed=12)]
    table, maps = analyze_views(pipeline(world, beta=0.01), batches, params, bins=10, return_bins=True)
    n_tok = sum(int(v.mask.sum()) for v in batches)
    counts = [r["tokens"] for r in table]
    assert sum(counts) == n_tok and max(counts) - min(counts) <= 1
    assert all(table[k]["vds_max"] <= table[k + 1]["vds_min"] for k in range(9))
    # direct: per-token terms by hand, token-mean gradient over each of the tool's bins
    ps = [p for _, p in params]
    terms = [direct_terms(world, v) for v in batches]
    vds = torch.cat([d["vds"][v.mask] for d, v in zip(terms, batches)])
    bins = torch.cat([m[v.mask] for m, v in zip(maps, batches)])
    # the tool's bins are the equal-frequency VDS bins (up to float ties between its VDS and ours)
    agree = (bins == equal_frequency_bins(vds, 10)).float().mean()
    assert agree > 0.7 and bool(vds[bins == 9].min() >= vds[bins == 0].max())
    per_tok = {k: torch.cat([d[k][v.mask] for d, v in zip(terms, batches)]) for k in ("std", "vis", "lang")}
    for row in table:
        sel = bins == row["bin"]
        assert int(sel.sum()) == row["tokens"]
        g = {}
        for k in ("std", "vis", "lang"):
            gs = torch.autograd.grad(per_tok[k][sel].mean(), ps, retain_graph=True, allow_unused=True)
            g[k] = torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).double() for x, p in zip(gs, ps)])
        for a, b in (("lang", "vis"), ("std", "vis"), ("std", "lang")):
            cos = float(g[a] @ g[b] / (g[a].norm() * g[b].norm()))
            ang = row[f"angle_{a}_{b}"]
            assert 0.0 <= ang <= 180.0
            assert abs(row[f"cos_{a}_{b}"] - cos) < 2e-3, (row["bin"], a, b, row[f"cos_{a}_{b}"], cos)
            assert abs(ang - math.degrees(math.acos(row[f"cos_{a}_{b}"]))) < 1e-9
            assert abs(ang - math.degrees(math.acos(max(-1.0, min(1.0, cos))))) < 0.5
        assert abs(row["norm_std"] - g["std"].norm().item()) < 1e-3 * row["norm_std"]
    tr = trend(table)
    assert -1.0 <= tr["spearman"] <= 1.0 and tr["first"] == table[0]["angle_lang_vis"]


def test_cli_smoke(embedded_cache, tmp_path):
    cache = embedded_cache
    out = str(tmp_path / "ana")
    rc = main(tiny_overrides(cache) + ["--out", out, "--batches", "1", "--batch-size", "3", "--bins", "4",
                                       "--params", SUBSET, "--quiet"])
    assert rc == 0
    for f in ("angles.csv", "angles.png", "angles.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    rows = list(csv.DictReader(open(os.path.join(out, "angles.csv"))))
    assert [int(r["bin"]) for r in rows] == [0, 1, 2, 3]
    assert all(0 <= float(r[k]) <= 180 for r in rows for k in ("angle_lang_vis", "angle_std_vis", "angle_std_lang"))
    assert json.load(open(os.path.join(out, "angles.json")))["param_pattern"] == SUBSET
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- analyze:start -->\nstale\n<!-- analyze:end -->\nb\n")
    assert main(["--report", os.path.join(out, "angles.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("a\n") and text.endswith("\nb\n")
    assert "| VDS decile | 0 | 1 | 2 | 3 |" in text and "Spearman" in text
