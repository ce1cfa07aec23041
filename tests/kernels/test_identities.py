"""The mathematical identities docs/math.md relies on, each checked independently."""

import pytest
import torch
import torch.nn.functional as F
from helpers import MODES, ragged_mask, random_logits

from vgs_kernels import vgs_loss


def _kl(a_logits, b_logits):
    la, lb = F.log_softmax(a_logits.double(), -1), F.log_softmax(b_logits.double(), -1)
    return (la.exp() * (la - lb)).sum(-1)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_sequence_and_token_reductions_differ_on_ragged_masks(backend):
    logits = random_logits(3, 8, 30, seed=1)
    mask = ragged_mask(3, 8)
    counts = mask.sum(1)
    assert len(set(counts[counts > 0].tolist())) > 1, "the mask must be ragged"
    seq = vgs_loss(*logits, mask, mode="standard", reduction="sequence", backend=backend).loss.item()
    tok = vgs_loss(*logits, mask, mode="standard", reduction="token", backend=backend).loss.item()
    std = _kl(logits[0], logits[2])
    per_seq = torch.stack([std[b][mask[b]].mean() for b in range(3) if mask[b].any()])
    assert seq == pytest.approx(per_seq.mean().item(), rel=1e-5)
    assert tok == pytest.approx(std[mask].mean().item(), rel=1e-5)
    assert abs(seq - tok) > 1e-3
    # equal lengths: both reductions agree
    full = torch.ones(3, 8, dtype=torch.bool)
    a = vgs_loss(*logits, full, reduction="sequence", backend=backend).loss.item()
    b = vgs_loss(*logits, full, reduction="token", backend=backend).loss.item()
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("n", [10, 37, 200])
def test_gate_fraction_is_top_30_percent(n):
    logits = random_logits(1, n, 50, seed=n)
    out = vgs_loss(*logits, backend="torch", return_per_token=True)
    vds = out.per_token["vds"].flatten()
    assert vds.unique().numel() == n, "VDS values must be distinct for this identity"
    assert abs(out.metrics["gate_fraction"] - 0.3) <= 1.0 / n + 1e-9
    assert out.metrics["threshold"] == pytest.approx(torch.quantile(vds.double(), 0.7).item(), rel=1e-6)
    assert torch.equal(out.per_token["gate"].flatten() > 0, vds > out.metrics["threshold"])


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_standard_mode_is_plain_reverse_kl(backend, temperature):
    logits = random_logits(2, 6, 40, seed=7)
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = vgs_loss(*logits, mask, mode="standard", reduction="token", temperature=temperature, backend=backend)
    expected = _kl(logits[0] / temperature, logits[2] / temperature).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # and through torch's own kl_div: KL(p||q) = sum p (log p - log q)
    lp = F.log_softmax(logits[0] / temperature, -1)
    lq = F.log_softmax(logits[2] / temperature, -1)
    kl = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).mean()
    assert out.loss.item() == pytest.approx(kl.item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_visual_target_with_blind_teacher_is_student_prior(backend):
    zs, zsp, zt, _ = random_logits(2, 5, 25, seed=3)
    out = vgs_loss(zs, zsp, zt, zt.clone(), backend=backend, return_per_token=True)
    assert torch.allclose(out.per_token["vds"], torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(out.per_token["vis"], _kl(zs, zsp).float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_visual_target_is_prior_times_teacher_gain(backend):
    zs, zsp, zt, ztp = random_logits(1, 4, 30, seed=11)
    out = vgs_loss(zs, zsp, zt, ztp, backend=backend, return_per_token=True, temperature=0.7)
    p1, q, q0 = (F.softmax(z.double() / 0.7, -1) for z in (zsp, zt, ztp))
    r = p1 * q / q0
    r = r / r.sum(-1, keepdim=True)
    p = F.softmax(zs.double() / 0.7, -1)
    vis = (p * (p.log() - r.log())).sum(-1)
    assert torch.allclose(out.per_token["vis"].double(), vis, rtol=1e-4)
    lang = _kl(zsp / 0.7, ztp / 0.7)
    assert torch.allclose(out.per_token["lang"].double(), lang, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_objective_matches_the_mode_table(mode):
    logits = random_logits(1, 20, 30, seed=13)
    out = vgs_loss(*logits, mode=mode, reduction="token", backend="torch", return_per_token=True,
                   gamma=0.5, alpha=2.0, beta=0.25)
    t = {k: v.flatten().double() for k, v in out.per_token.items()}
    if mode == "standard":
        obj = t["std"]
    elif mode == "vgs":
        obj = t["std"] + 2 * t["vis"] + 0.25 * t["gate"] * t["lang"]
    elif mode == "language":
        obj = t["std"] + 2 * t["lang"] + 0.25 * t["gate"] * t["vis"]
    else:
        lo, hi = torch.quantile(t["vds"], torch.tensor([0.4, 0.7], dtype=torch.float64))
        w = ((t["vds"] - lo) / (hi - lo)).clamp(0, 1)
        obj = t["std"] + 2 * w * t["vis"] + 0.25 * t["gate"] * t["lang"]
    assert out.loss.item() == pytest.approx(0.5 * obj.mean().item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_extreme_logits_do_not_produce_nan(backend):
    zs, zsp, zt, ztp = random_logits(2, 4, 16, seed=5, scale=1e4)
    for z in (zs, zsp, zt, ztp):
        z[:, :, 3] = float("-inf")  # a vocabulary entry masked in every stream
    zsp[0, 1, 5] = float("-inf")
    zs = zs.requires_grad_()
    zsp = zsp.requires_grad_()
    out = vgs_loss(zs, zsp, zt, ztp, backend=backend, temperature=0.7)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(zs.grad).all() and torch.isfinite(zsp.grad).all()
    assert all(v == v for v in out.metrics.values())


def test_gamma_scales_loss_and_gradients():
    logits = random_logits(2, 4, 16, seed=8)
    zs = logits[0].clone().requires_grad_()
    a = vgs_loss(zs, *logits[1:], backend="torch", gamma=1.0)
    a.loss.backward()
    g1 = zs.grad.clone()
    zs.grad = None
    b = vgs_loss(zs, *logits[1:], backend="torch", gamma=0.41)
    b.loss.backward()
    assert b.loss.item() == pytest.approx(0.41 * a.loss.item(), rel=1e-6)
    assert torch.allclose(zs.grad, 0.41 * g1, rtol=1e-5, atol=1e-9)
