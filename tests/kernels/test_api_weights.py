"""The trainer-facing options against an oracle built from the materialised reference.

weights= x reduction {token, sequence, sum}, reduction="none" with a random upstream gradient, gate=,
sync_metrics=False and the sparse-teacher errors, on both loss functions and every row backend that
runs on CPU tensors (torch, cpu when built, triton in its interpreter: tiny shapes).

The oracle does not reuse the reduction code under test: it takes the reference's per-token losses
(reduction="none", checked against the per-token KLs by the paper's formula) and weighs them with
reduction weights computed here by hand; autograd gives its gradients.
"""

from __future__ import annotations

import pytest
import torch
from helpers import MODES, assert_close, backend_params, ragged_mask, random_logits

from vgs_kernels import VGSLoss, fused_linear_vgs_loss, vgs_loss

ALPHA, BETA, GAMMA = 1.5, 0.3, 0.7  # beta large enough that a wrong gate shows in the loss
KW = dict(alpha=ALPHA, beta=BETA, gamma=GAMMA, temperature=0.9)
ROW_BACKENDS = backend_params(("torch", "cpu", "triton"))
TOL = (2e-5, 2e-5)


def modes_for(backend):  # the Triton interpreter is slow: two modes cover both gated-pass shapes
    return ("vgs", "adaptive") if backend == "triton" else MODES


def token_weights(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, t, generator=g) * 2 - 0.5  # some negative, e.g. advantages
    w[0, 1] = 0.0  # a valid token with weight 0
    return w


def objective(pt, mode, gate=None):
    """The per-token objective by the paper's formula from the per-token KLs (gamma excluded)."""
    g = pt["gate"] if gate is None else gate.float()
    std, vis, lang = pt["std"], pt["vis"], pt["lang"]
    if mode == "standard":
        return std
    if mode == "vgs":
        return std + ALPHA * vis + BETA * g * lang
    if mode == "language":
        return std + ALPHA * lang + BETA * g * vis
    return None  # adaptive: the ramp is not in per_token; checked through the loss instead


def hand_weights(mask, reduction, w=None):
    """Reduction weights [B, T] by hand (0 on masked tokens)."""
    m = mask.double()
    w = torch.ones_like(m) if w is None else w.double()
    if reduction == "sum":
        return w * m
    if reduction == "token":
        return w * m / m.sum().clamp_min(1)
    per_seq = m.sum(1, keepdim=True)
    n_seq = (per_seq > 0).sum().clamp_min(1)
    return w * m / (per_seq.clamp_min(1) * n_seq)


def oracle_logits(logits, mask, reduction, w=None, gate=None, upstream=None, **kw):
    """Expected (loss, grad_zs, grad_zsp) from the reference's per-token losses."""
    zs, zsp = (z.clone().double().requires_grad_() for z in logits[:2])
    zt, ztp = (z.double() for z in logits[2:])
    out = vgs_loss(zs, zsp, zt, ztp, mask, reduction="none", gate=gate, backend="reference",
                   return_per_token=True, **KW, **kw)
    per_token = out.loss  # [B, T], 0 on masked tokens
    obj = objective(out.per_token, kw.get("mode", "vgs"), gate)
    if obj is not None:
        m = mask if mask is not None else torch.ones(per_token.shape, dtype=torch.bool)
        assert_close(per_token.detach(), (GAMMA * obj.double() * m).detach(), 1e-6, 1e-6, "reference per-token loss")
    if upstream is not None:  # reduction="none": the loss is the per-token tensor
        per_token.backward(upstream.double())
        return per_token.detach(), zs.grad, zsp.grad
    loss = (per_token * hand_weights(mask, reduction, w)).sum()
    loss.backward()
    return loss.detach(), zs.grad, zsp.grad


def run_logits(backend, logits, mask, upstream=None, **kw):
    zs, zsp = (z.clone().requires_grad_() for z in logits[:2])
    out = vgs_loss(zs, zsp, logits[2], logits[3], mask, backend=backend, **KW, **kw)
    out.loss.backward(torch.ones_like(out.loss) if upstream is None else upstream)
    return out, zs.grad, zsp.grad


def check(got, want, what):
    for g, e, name in zip(got, want, ("loss", "grad student", "grad student_text")):
        assert_close(g.detach() if g is not None else None, e, *TOL, f"{what}: {name}")


# ------------------------------------------------------------------ vgs_loss


@pytest.mark.parametrize("backend", ["reference", *ROW_BACKENDS])
@pytest.mark.parametrize("reduction", ["token", "sequence", "sum"])
def test_weights_match_the_oracle(backend, reduction):
    logits = random_logits(3, 5, 37, seed=1)
    mask = ragged_mask(3, 5)
    w = token_weights(3, 5)
    modes = modes_for(backend) if backend != "reference" else MODES
    for mode in modes:
        want = oracle_logits(logits, mask, reduction, w, mode=mode)
        out, gs, gsp = run_logits(backend, logits, mask, weights=w, reduction=reduction, mode=mode)
        check((out.loss, gs, gsp), want, f"{backend} {mode} {reduction}")
        assert gs.dtype == torch.float32


def test_weights_without_mask_mask_the_zero_weight_tokens():
    logits = random_logits(2, 6, 20, seed=2)
    w = token_weights(2, 6, seed=3)
    w[1, 2:] = 0.0
    for reduction in ("token", "sequence"):
        a = run_logits("torch", logits, None, weights=w, reduction=reduction)
        b = run_logits("torch", logits, w != 0, weights=w, reduction=reduction)
        check((a[0].loss, a[1], a[2]), (b[0].loss, b[1], b[2]), reduction)
        assert a[0].metrics["std"] == pytest.approx(b[0].metrics["std"])
    # with a mask, a weight-0 token still counts in the token mean's denominator
    full = torch.ones(2, 6, dtype=torch.bool)
    a = run_logits("torch", logits, full, weights=w, reduction="token")[0].loss
    b = run_logits("torch", logits, full, weights=w, reduction="sum")[0].loss
    assert a.item() == pytest.approx(b.item() / 12, rel=1e-6)


@pytest.mark.parametrize("backend", ["reference", *ROW_BACKENDS])
def test_reduction_none_with_a_random_upstream_gradient(backend):
    logits = random_logits(3, 4, 29, seed=4)
    mask = ragged_mask(3, 4)
    upstream = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    for mode in modes_for(backend):
        want = oracle_logits(logits, mask, "none", upstream=upstream, mode=mode)
        out, gs, gsp = run_logits(backend, logits, mask, upstream=upstream, reduction="none", mode=mode)
        assert out.loss.shape == (3, 4) and out.loss.requires_grad
        assert torch.all(out.loss[~mask] == 0)
        check((out.loss, gs, gsp), want, f"{backend} {mode} none")
    # weights multiply the per-token losses; packed [N, V] rows give [N] losses
    w = token_weights(3, 4)
    a = run_logits(backend, logits, mask, reduction="none", weights=w)[0].loss
    b = run_logits(backend, logits, mask, reduction="none")[0].loss
    assert_close(a.detach(), (b * w).detach(), *TOL, "weights x none")
    flat = [z.reshape(12, -1) for z in logits]
    c = run_logits(backend, flat, mask.reshape(12), reduction="none")[0].loss
    assert c.shape == (12,)
    assert_close(c.detach(), b.detach().reshape(12), *TOL, "[N, V] none")


@pytest.mark.parametrize("backend", ["reference", *ROW_BACKENDS])
def test_gate_replaces_the_quantile_gate(backend):
    logits = random_logits(3, 5, 23, seed=6)
    mask = ragged_mask(3, 5)
    gate = torch.rand(3, 5, generator=torch.Generator().manual_seed(7)) > 0.5
    for mode in [m for m in modes_for(backend) if m != "adaptive"]:
        want = oracle_logits(logits, mask, "sequence", gate=gate, mode=mode)
        out, gs, gsp = run_logits(backend, logits, mask, gate=gate, mode=mode, return_per_token=True)
        check((out.loss, gs, gsp), want, f"{backend} {mode} gate=")
        assert torch.equal(out.per_token["gate"].bool(), gate & mask)
        assert out.metrics["gate_fraction"] == pytest.approx((gate & mask).sum().item() / mask.sum().item())
        assert out.metrics["threshold"] != out.metrics["threshold"]  # NaN: no threshold was used
    # the quantile gate passed as gate= gives the quantile call's loss and gradients
    base = run_logits(backend, logits, mask, return_per_token=True)
    same = run_logits(backend, logits, mask, gate=base[0].per_token["gate"].bool())
    check((same[0].loss, same[1], same[2]), (base[0].loss, base[1], base[2]), f"{backend} quantile gate as gate=")


def test_sync_metrics_false_keeps_tensors():
    logits = random_logits(2, 5, 19, seed=8)
    mask = ragged_mask(2, 5)
    a = vgs_loss(*logits, mask, backend="torch").metrics
    b = vgs_loss(*logits, mask, backend="torch", sync_metrics=False).metrics
    for k, v in a.items():
        if k == "threshold":
            assert isinstance(b[k], float) and b[k] == v
        else:
            assert isinstance(b[k], torch.Tensor) and b[k].dim() == 0
            assert b[k].item() == pytest.approx(v, rel=1e-6)
    c = vgs_loss(logits[0], None, logits[2], None, mask, mode="standard", backend="torch", sync_metrics=False)
    assert torch.isnan(c.metrics["vis"]) and c.metrics["std"].item() == pytest.approx(a["std"], rel=1e-6)


# ------------------------------------------------------------------ fused_linear_vgs_loss


def fused_tensors(b, t, v, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    return [r(b, t, 8), r(b, t, 8), r(v, 8, scale=0.6), r(v, scale=0.5), r(b, t, 6), r(b, t, 6),
            r(v, 6, scale=0.6), r(v, scale=0.5)]


def fused_oracle(tensors, mask, reduction, w=None, gate=None, **kw):
    hs, hsp, ws, bs = (x.clone().double().requires_grad_() for x in tensors[:4])
    ht, htp, wt, bt = (x.double() for x in tensors[4:])
    logits = [h @ W.T + b for h, W, b in ((hs, ws, bs), (hsp, ws, bs), (ht, wt, bt), (htp, wt, bt))]
    out = vgs_loss(*logits, mask, reduction="none", gate=gate, backend="reference", **KW, **kw)
    loss = (out.loss * hand_weights(mask, reduction, w)).sum()
    loss.backward()
    return loss.detach(), [x.grad for x in (hs, hsp, ws, bs)]


def run_fused(backend, tensors, mask, **kw):
    hs, hsp, ws, bs = (x.clone().requires_grad_() for x in tensors[:4])
    ht, htp, wt, bt = tensors[4:]
    out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, mask, student_bias=bs, teacher_bias=bt,
                                backend=backend, chunk_size=4, **KW, **kw)
    out.loss.backward()
    return out, [x.grad for x in (hs, hsp, ws, bs)]


@pytest.mark.parametrize("backend", ["reference", *ROW_BACKENDS])
@pytest.mark.parametrize("reduction", ["token", "sequence", "sum"])
def test_fused_weights_match_the_oracle(backend, reduction):
    tensors = fused_tensors(3, 4, 21, seed=9)
    mask = ragged_mask(3, 4)
    w = token_weights(3, 4, seed=2)
    modes = ("vgs",) if backend == "triton" else ("vgs", "adaptive", "language")
    for mode in modes:
        loss, grads = fused_oracle(tensors, mask, reduction, w, mode=mode)
        out, got = run_fused(backend, tensors, mask, weights=w, reduction=reduction, mode=mode)
        assert_close(out.loss.detach(), loss, *TOL, f"{backend} {mode} {reduction} loss")
        for g, e, name in zip(got, grads, ("student_hidden", "student_text_hidden", "student_weight", "bias")):
            assert_close(g, e, *TOL, f"{backend} {mode} {reduction} grad {name}")


@pytest.mark.parametrize("backend", ["reference", *ROW_BACKENDS])
def test_fused_gate_matches_the_oracle(backend):
    tensors = fused_tensors(2, 5, 17, seed=10)
    mask = ragged_mask(2, 5)
    gate = torch.rand(2, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    loss, grads = fused_oracle(tensors, mask, "token", gate=gate, mode="language")
    out, got = run_fused(backend, tensors, mask, gate=gate, reduction="token", mode="language")
    assert_close(out.loss.detach(), loss, *TOL, "loss")
    for g, e in zip(got, grads):
        assert_close(g, e, *TOL, "grad")
    # VGSLoss passes the per-batch tensors through forward
    module = VGSLoss(mode="language", reduction="token", backend=backend, chunk_size=4, **KW)
    hs, hsp, ws, bs = (x.clone().requires_grad_() for x in tensors[:4])
    out2 = module(hs, hsp, ws, *tensors[4:7], mask, student_bias=bs, teacher_bias=tensors[7], gate=gate)
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_fused_refuses_reduction_none_with_the_recipe():
    tensors = fused_tensors(2, 3, 11, seed=1)
    with pytest.raises(ValueError, match=r"reduction='none'.*weights= with reduction='sum'"):
        fused_linear_vgs_loss(*tensors[:3], *tensors[4:7], reduction="none")
    with pytest.raises(ValueError, match="reduction='none'"):
        VGSLoss(reduction="none")


# ------------------------------------------------------------------ sparse (top-k) teachers


def topk_teacher(z, k):
    """Keep each row's top-k logits, -inf elsewhere (what a remote top-k teacher sends)."""
    top = z.topk(k, dim=-1).indices
    out = torch.full_like(z, float("-inf"))
    return out.scatter(-1, top, z.gather(-1, top))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_sparse_teacher_raises_naming_the_stream(backend):
    zs, zsp, zt, ztp = random_logits(2, 4, 30, seed=11)
    mask = ragged_mask(2, 4)
    with pytest.raises(ValueError, match=r"teacher_logits has -inf .* full teacher logits are needed"):
        vgs_loss(zs, zsp, topk_teacher(zt, 5), ztp, mask, backend=backend)
    with pytest.raises(ValueError, match=r"teacher_text_logits has -inf"):
        vgs_loss(zs, zsp, zt, topk_teacher(ztp, 5), mask, backend=backend)
    with pytest.raises(ValueError, match=r"teacher_logits has -inf"):
        vgs_loss(zs, None, topk_teacher(zt, 5), None, mask, mode="standard", backend=backend)
    # -inf on masked rows only, or where the other stream has -inf too (a shared vocabulary mask): fine
    zt_masked = zt.clone()
    zt_masked[1] = topk_teacher(zt[1], 3)  # sequence 1 is fully masked
    vgs_loss(zs, zsp, zt_masked, ztp, mask, backend=backend)
    shared = [z.clone() for z in (zs, zsp, zt, ztp)]
    for z in shared:
        z[..., 25:] = float("-inf")
    ref = vgs_loss(*[z[..., :25] for z in shared], mask, backend="reference").loss
    got = vgs_loss(*shared, mask, backend=backend).loss
    assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_sparse_teacher_bias_raises_on_the_fused_path():
    tensors = fused_tensors(2, 3, 13, seed=12)
    bt = tensors[7].clone()
    bt[4] = float("-inf")
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=r"teacher_bias has -inf .* full teacher logits"):
            fused_linear_vgs_loss(*tensors[:3], *tensors[4:7], student_bias=tensors[3], teacher_bias=bt,
                                  backend=backend)
    bs = tensors[3].clone()
    bs[4] = float("-inf")  # both heads mask id 4: allowed
    out = fused_linear_vgs_loss(*tensors[:3], *tensors[4:7], student_bias=bs, teacher_bias=bt, backend="torch")
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------ argument checks


def test_new_arguments_are_checked():
    logits = random_logits(2, 3, 7)
    mask = torch.ones(2, 3, dtype=torch.bool)
    bad = [
        (dict(weights=torch.ones(3, 2)), r"weights must have shape \(2, 3\)"),
        (dict(weights=torch.ones(2, 3, dtype=torch.long)), "weights must be a floating-point"),
        (dict(weights=torch.full((2, 3), float("nan"))), "weights must be finite"),
        (dict(cu_seqlens=torch.tensor([0, 6])), r"cu_seqlens is for packed \[N, V\]"),
        (dict(gate=torch.ones(2, 2, dtype=torch.bool)), r"gate must have shape \(2, 3\)"),
        (dict(gate=torch.ones(2, 3)), "gate must be bool"),
        (dict(gate=mask, threshold=0.3), "gate= or threshold=, not both"),
        (dict(gate=mask, mode="adaptive"), r"threshold=\(theta_low, theta_high\)"),
        (dict(reduction="mean"), "reduction must be one of"),
        (dict(vds_scope="local", process_group=object()), "process_group is only used with vds_scope='global'"),
        (dict(process_group="world"), "process_group must be a torch.distributed ProcessGroup"),
        (dict(sync_metrics="no"), "sync_metrics must be a bool"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            vgs_loss(*logits, mask, backend="torch", **kw)
    flat = [z.reshape(6, -1) for z in logits]
    for cu, match in ((torch.tensor([0, 2, 5]), "end at N=6"), (torch.tensor([1, 6]), "start at 0"),
                      (torch.tensor([0, 4, 2, 6]), "never decrease"), (torch.tensor([0.0, 6.0]), "integer tensor"),
                      (torch.zeros(2, 2, dtype=torch.long), r"1-D \[S \+ 1\]")):
        with pytest.raises(ValueError, match=match):
            vgs_loss(*flat, cu_seqlens=cu, backend="torch")
