"""GRPO (paper Sec. 8, Eq. 22): group-normalised advantages and the clipped surrogate against hand
computations; lambda = 0 is pure GRPO and lambda = 1 pure distillation (Eq. 22 as in docs/math.md:
J = (1 - lambda) J_GRPO - lambda L); rewards; a rollout batch end to end."""

import math

import pytest
import torch
from train_helpers import flat_grad, pipeline, sample, tiny_overrides

from vgs_train.data.rewards import exact_match, format_exact_match, get_reward_fn
from vgs_train.loops.grpo import (
    GRPOBatch,
    clipped_surrogate,
    combine,
    group_advantages,
    grpo_loss,
    rollout_groups,
    token_logprobs,
)


def test_group_advantages_by_hand():
    r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0]
    adv = group_advantages(r, 4, eps=0.0 + 1e-4)
    s1 = math.sqrt((4 * 0.25) / 3)  # unbiased std of (1, 0, 0, 1)
    s3 = math.sqrt((3 * 0.75 ** 2 + 2.25 ** 2) / 3)  # (0, 0, 0, 3): mean 0.75
    want = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 0, 0, 0, 0,
            -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), -0.75 / (s3 + 1e-4), 2.25 / (s3 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(group_advantages(torch.tensor(r).view(3, 4), 4), adv)
    with pytest.raises(ValueError):
        group_advantages(r, 5)


def test_clipped_surrogate_by_hand():
    # two sequences: A = +1 (3 tokens) and A = -1 (2 valid tokens of 3)
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 9.0]], dtype=torch.float64)
    old = torch.log(torch.tensor([[0.2, 0.4, 0.3], [0.1, 0.6, 0.5]], dtype=torch.float64))
    logp = (old + torch.log(ratios)).requires_grad_(True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    j, m = clipped_surrogate(logp, old, adv, mask, epsilon=0.2)
    # A=+1: min(1.5,1.2)=1.2, min(0.5,0.8)=0.5, min(1.1,1.1)=1.1; A=-1: min(-1.5,-1.2)=-1.5, min(-0.5,-0.8)=-0.8
    want = 0.5 * ((1.2 + 0.5 + 1.1) / 3) + 0.5 * ((-1.5 - 0.8) / 2)
    assert abs(j.item() - want) < 1e-12
    assert abs(m["clip_fraction"] - 2 / 5) < 1e-6  # clipped branch active on tokens (0,0) and (1,1)
    (g,) = torch.autograd.grad(j, logp)
    # d/dlogp of ratio*A = ratio*A on the unclipped branch, 0 on the clipped one, times the token weight
    # (token weights 1/6 in sequence 0, 1/4 in sequence 1)
    want_g = torch.tensor([[0.0, 0.5 / 6, 1.1 / 6], [-1.5 / 4, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(g, want_g)
    # token reduction and asymmetric clipping
    j_tok, _ = clipped_surrogate(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.6, reduction="token")
    assert abs(j_tok.item() - (1.5 + 0.5 + 1.1 - 1.5 - 0.8) / 5) < 1e-12


def test_token_logprobs_match_materialised():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.rand(2, 5) > 0.3
    lp = token_logprobs(h, w, ids, mask, vocab_size=11, temperature=0.7, chunk_size=3)
    ref = torch.log_softmax((h @ w[:11].T) / 0.7, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(lp.sum(), (h, w))
    g2 = torch.autograd.grad(ref.sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_combine():
    j, d = torch.tensor(2.0), torch.tensor(5.0)
    assert combine(j, d, 0.0).item() == -2.0
    assert combine(None, d, 1.0).item() == 5.0
    assert abs(combine(j, d, 0.3).item() - (-0.7 * 2 + 0.3 * 5)) < 1e-6
    with pytest.raises(ValueError):
        combine(j, d, 1.5)


def _batch(world, G=2, n=2):
    views = sample(world, n=n, max_new_tokens=6, seed=3, samples_per_prompt=G)
    torch.manual_seed(7)
    r = torch.rand(n * G)
    return GRPOBatch(views, r, r > 0.5, group_advantages(r, G), ["x"] * (n * G), group_size=G)


def test_lambda_endpoints(world):
    """lambda=0: the gradient of -J_GRPO alone; lambda=1: the distillation loss alone; in between the
    convex combination of the two."""
    from vgs_kernels import fused_linear_vgs_loss
    from vgs_train.pipeline.views import four_view_hidden, response_hidden

    s, t, V = world["student"], world["teacher"], world["vocab"]
    params = [p for p in s.parameters() if p.requires_grad]
    batch = _batch(world)
    views = batch.views
    kw = dict(alpha=2.0, beta=0.01, gamma=0.5)

    # independent computations
    hs = response_hidden(s, views.image, views.completion_ids.shape[1])
    lp = torch.log_softmax(s.get_output_embeddings()(hs).float()[..., :V], -1)
    lp = lp.gather(-1, views.completion_ids.unsqueeze(-1)).squeeze(-1)
    j_ref = sum(((batch.advantages[i] * (lp[i] - lp[i].detach()).exp())[views.mask[i]].mean())
                for i in range(lp.shape[0])) / lp.shape[0]
    g_grpo = flat_grad(-j_ref, params)
    hs, hsp, ht, htp = four_view_hidden(s, t, views)
    d_ref = fused_linear_vgs_loss(hs, hsp, s.get_output_embeddings().weight, ht, htp,
                                  t.get_output_embeddings().weight, views.mask, vocab_size=V, mode="vgs", **kw).loss
    g_dist = flat_grad(d_ref, params)

    def g_of(lam, mode="vgs"):
        batch.old_logp = None
        loss, m = grpo_loss(pipeline(world, **kw), batch, lam=lam, distill_mode=mode)
        return flat_grad(loss, params), m

    g0, m0 = g_of(0.0)
    torch.testing.assert_close(g0, g_grpo, rtol=1e-4, atol=1e-8)
    assert "distill_loss" not in m0 and abs(m0["ratio_mean"] - 1.0) < 1e-6
    g1, m1 = g_of(1.0)
    torch.testing.assert_close(g1, g_dist, rtol=1e-4, atol=1e-8)
    assert "grpo_objective" not in m1 and abs(m1["distill_loss"] - d_ref.item()) < 1e-5
    g3, m3 = g_of(0.3)
    torch.testing.assert_close(g3, 0.7 * g_grpo + 0.3 * g_dist, rtol=1e-4, atol=1e-8)
    for k in ("reward", "accuracy", "response_len", "grpo_objective", "distill_loss", "std", "vis", "lang", "loss"):
        assert k in m3
    # method "grpo" (no regulariser) ignores lambda
    g_pure, _ = g_of(0.3, mode=None)
    torch.testing.assert_close(g_pure, g_grpo, rtol=1e-4, atol=1e-8)


def test_rollout_groups_and_rewards(world):
    torch.manual_seed(0)
    batch = rollout_groups(pipeline(world, max_new_tokens=6), world["rows"][:3], 4, reward_fn=lambda t, a: float(len(t)))
    assert batch.views.completion_ids.shape[0] == 12 and batch.rewards.shape == (12,)
    assert torch.allclose(batch.advantages.view(3, 4).mean(1), torch.zeros(3), atol=1e-5)
    assert batch.rewards.tolist() == [float(len(x)) for x in batch.texts]
    # the G copies of a prompt are contiguous and share the image
    P = batch.views.image["response_start"]
    assert torch.equal(batch.views.image["input_ids"][0, :P], batch.views.image["input_ids"][3, :P])
    pix = batch.views.image["pixel_values"].view(12, -1, batch.views.image["pixel_values"].shape[-1])
    assert torch.equal(pix[0], pix[3]) and not torch.equal(pix[0], pix[4])
    # rewards
    assert exact_match("<reason>I see a red circle.</reason> Red.", "red") == 1.0
    assert exact_match("<reason>x</reason>blue", "red") == 0.0
    assert abs(format_exact_match("<reason>x</reason>blue", "red") - 0.1) < 1e-9
    assert get_reward_fn("vgs_train.data.rewards:exact_match") is exact_match
    with pytest.raises(ValueError, match="grpo.reward"):
        get_reward_fn("nope")


def _integrated():
    from vgs_train import config

    return hasattr(config, "GRPO_METHODS")


@pytest.mark.skipif(not _integrated(), reason="GRPO methods not wired into the trainer")
def test_train_cli_smoke(embedded_cache, tmp_path):
    import json

    from vgs_train.cli import train_main
    from vgs_train.config import load_config

    cache = embedded_cache
    out = tmp_path / "grpo_vgs"
    rc = train_main(tiny_overrides(cache, str(out), "loss.method=grpo+vgs", "rollout.samples_per_prompt=2",
                                   "run.max_steps=2", "grpo.iterations=2", "grpo.epsilon=0.1"))
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for k in ("loss", "reward", "accuracy", "response_len", "grpo_objective", "distill_loss", "std", "vis",
              "clip_fraction", "ratio_mean", "lam"):
        assert k in lines[0], k
    assert lines[0]["lam"] == 0.3 and abs(lines[0]["ratio_mean"] - 1) < 1e-5
    assert lines[1]["time_rollout"] == 0.0  # the second iteration reuses the rollouts
    assert load_config(str(out / "config.yaml")).grpo.iterations == 2
    out = tmp_path / "grpo"
    assert train_main(tiny_overrides(cache, str(out), "loss.method=grpo", "rollout.samples_per_prompt=2",
                                     "run.max_steps=1")) == 0
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "distill_loss" not in m and "grpo_objective" in m and m["lam"] == 0.0
    for bad, msg in (("rollout.samples_per_prompt=1", "samples_per_prompt"), ("grpo.lam=2", "grpo.lam"),
                     ("grpo.reward=nope", "grpo.reward")):
        with pytest.raises(ValueError, match=msg):
            load_config(None, ["loss.method=grpo+opd", "rollout.samples_per_prompt=4", bad])
