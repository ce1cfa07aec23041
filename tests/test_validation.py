"""Bad input fails with a ValueError that names the argument; backends report themselves."""

import pytest
import torch
from helpers import random_logits

import vgs_kernels
from vgs_kernels import VGSLoss, fused_linear_vgs_loss, vgs_loss


@pytest.fixture
def logits():
    return random_logits(2, 3, 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="vgs-lp"), "mode must be one of"),
        (dict(reduction="mean"), "reduction must be one of"),
        (dict(backend="fast"), "backend must be one of"),
        (dict(quantile=1.0), "quantile must lie in"),
        (dict(quantile=0.0), "quantile must lie in"),
        (dict(adaptive_quantiles=(0.7, 0.4)), "adaptive_quantiles"),
        (dict(adaptive_quantiles=(0.0, 0.4)), "adaptive_quantiles"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(vds_scope="world"), "vds_scope"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=11), "vocab_size=11 exceeds"),
        (dict(threshold=(0.1, 0.2)), "threshold must be a single float"),
        (dict(mode="adaptive", threshold=0.3), "mode='adaptive' needs two thresholds"),
        (dict(alpha=float("nan")), "alpha"),
    ],
)
def test_bad_keywords(logits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vgs_loss(*logits, **kwargs)


def test_shape_mismatches_name_the_argument(logits):
    zs, zsp, zt, ztp = logits
    with pytest.raises(ValueError, match="student_text_logits must have the shape of student_logits"):
        vgs_loss(zs, zsp[:, :2], zt, ztp)
    with pytest.raises(ValueError, match="teacher_text_logits must have the shape of teacher_logits"):
        vgs_loss(zs, zsp, zt, ztp[..., :5])
    with pytest.raises(ValueError, match="teacher_logits must have the leading"):
        vgs_loss(zs, zsp, zt[:1], ztp[:1])
    with pytest.raises(ValueError, match="disagree on the vocabulary"):
        vgs_loss(zs, zsp, zt[..., :8], ztp[..., :8])
    with pytest.raises(ValueError, match="student_logits must be 2-D or 3-D"):
        vgs_loss(zs[0, 0], zsp, zt, ztp)
    with pytest.raises(ValueError, match="mask must have shape"):
        vgs_loss(*logits, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        vgs_loss(*logits, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="floating-point"):
        vgs_loss(zs.long(), zsp, zt, ztp)


def test_vocab_size_reconciles_different_heads(logits):
    zs, zsp, zt, ztp = logits
    out = vgs_loss(zs, zsp, zt[..., :8], ztp[..., :8], vocab_size=8, backend="torch")
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("stream", [0, 1, 2, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_name_the_stream(logits, stream, bad):
    logits[stream][1, 2, 4] = bad
    names = ["student_logits", "student_text_logits", "teacher_logits", "teacher_text_logits"]
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=f"^{names[stream]} contains NaN or \\+inf"):
            vgs_loss(*logits, backend=backend)


def test_fused_linear_validation():
    h = torch.randn(2, 3, 8)
    ht = torch.randn(2, 3, 12)
    w = torch.randn(20, 8)
    wt = torch.randn(20, 12)
    with pytest.raises(ValueError, match=r"student_weight must have shape \[V, 8\]"):
        fused_linear_vgs_loss(h, h, torch.randn(20, 9), ht, ht, wt)
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \[V, 12\]"):
        fused_linear_vgs_loss(h, h, w, ht, ht, w)
    with pytest.raises(ValueError, match="student_bias must have shape"):
        fused_linear_vgs_loss(h, h, w, ht, ht, wt, student_bias=torch.randn(19))
    with pytest.raises(ValueError, match="teacher_hidden must have the leading"):
        fused_linear_vgs_loss(h, h, w, ht[:1], ht[:1], wt)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fused_linear_vgs_loss(h, h, w, ht, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="student_text_hidden must have the dtype"):
        fused_linear_vgs_loss(h, h.double(), w, ht, ht, wt)
    bad = h.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^student_hidden contains NaN"):
        fused_linear_vgs_loss(bad, h, w, ht, ht, wt, backend="torch")


def test_unavailable_backend_lists_the_available_ones(logits):
    status = vgs_kernels.backends()
    assert status["reference"] == "available" and status["torch"] == "available"
    missing = [k for k, v in status.items() if v != "available"]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match="Available backends: .*'torch'"):
        vgs_loss(*logits, backend=missing[0])


def test_vgsloss_module_checks_keywords_at_construction():
    with pytest.raises(ValueError, match="mode must be one of"):
        VGSLoss(mode="nope")
    loss_fn = VGSLoss(mode="vgs", gamma=0.41, backend="torch", chunk_size=2)
    h, ht = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 12)
    w, wt = torch.randn(20, 8, requires_grad=True), torch.randn(20, 12)
    out = loss_fn(h, h, w, ht, ht, wt)
    out.loss.backward()
    direct = fused_linear_vgs_loss(h, h, w, ht, ht, wt, gamma=0.41, backend="reference")
    assert out.loss.item() == pytest.approx(direct.loss.item(), rel=1e-5)
    assert "gamma=0.41" in repr(loss_fn)
