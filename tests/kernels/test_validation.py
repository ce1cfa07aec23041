"""Bad input fails with a ValueError that names the argument; backends report themselves."""

import pytest
import torch
from helpers import random_logits

import vgs_kernels
from vgs_kernels import VGSLoss, fused_linear_vgs_loss, vgs_loss
from vgs_kernels.backends import is_available


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
        # flags must be real bools: a string such as "no" is truthy
        (dict(detach_target_prior="no"), "detach_target_prior must be a bool"),
        (dict(return_per_token="no"), "return_per_token must be a bool"),
        (dict(detach_target_prior=1), "detach_target_prior must be a bool"),
        # numbers must not be bools (True would silently mean 1)
        (dict(temperature=True), "temperature must be a finite number"),
        (dict(alpha=True), "alpha must be a finite number"),
        (dict(beta=False), "beta must be a finite number"),
        (dict(gamma=True), "gamma must be a finite number"),
        # NEG_LOGIT / tau would overflow fp32 below ~3e-9; the floor is 1e-6
        (dict(temperature=1e-9), "temperature must be >= 1e-06"),
        (dict(temperature=5e-7), "temperature must be >= 1e-06"),
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
    with pytest.raises(ValueError, match="student_logits and teacher_logits disagree on the vocabulary"):
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
    assert is_available(status["reference"]) and is_available(status["torch"])
    missing = [k for k, v in status.items() if not is_available(v)]
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


def test_smallest_temperature_keeps_masked_logits_finite(logits):
    # -inf logits (masked vocabulary) at the smallest accepted temperature: no overflow to NaN
    for z in logits:
        z[..., 7] = float("-inf")
    for backend in ("reference", "torch"):
        out = vgs_loss(*logits, temperature=1e-6, backend=backend)
        assert torch.isfinite(out.loss), backend


@pytest.mark.parametrize("stream", [0, 1, 2, 3])
def test_empty_vocabulary_logits_name_the_argument(logits, stream):
    names = ["student_logits", "student_text_logits", "teacher_logits", "teacher_text_logits"]
    logits = [z[..., :0] if i == stream or (i ^ 1) == stream else z for i, z in enumerate(logits)]
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=rf"^{names[stream & 2]} has an empty vocabulary \(V=0\)"):
            vgs_loss(*logits, backend=backend)
    with pytest.raises(ValueError, match="has an empty vocabulary"):
        vgs_loss(*(z[0] for z in logits))  # [N, V] inputs too


def test_empty_vocabulary_weights_name_the_argument():
    h, ht = torch.randn(2, 3, 8), torch.randn(2, 3, 12)
    w, wt = torch.randn(20, 8), torch.randn(20, 12)
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=r"^student_weight has an empty vocabulary \(V=0"):
            fused_linear_vgs_loss(h, h, w[:0], ht, ht, wt, backend=backend)
        with pytest.raises(ValueError, match=r"^teacher_weight has an empty vocabulary \(V=0"):
            fused_linear_vgs_loss(h, h, w, ht, ht, wt[:0], backend=backend)
        with pytest.raises(ValueError, match=r"^student_hidden has an empty hidden size \(H=0\)"):
            fused_linear_vgs_loss(h[..., :0], h[..., :0], w[:, :0], ht, ht, wt, backend=backend)


def test_fused_vocabulary_mismatch_names_the_weights():
    h, ht = torch.randn(2, 3, 8), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="student_weight and teacher_weight disagree on the vocabulary"):
        fused_linear_vgs_loss(h, h, torch.randn(20, 8), ht, ht, torch.randn(23, 12))
    with pytest.raises(ValueError, match=r"vocab_size=21 exceeds the vocabulary of student_weight \(20 ids\)"):
        fused_linear_vgs_loss(h, h, torch.randn(20, 8), ht, ht, torch.randn(23, 12), vocab_size=21)


@pytest.mark.parametrize("which", ["student_bias", "teacher_bias"])
def test_bias_on_another_device_names_the_bias(which):
    h, ht = torch.randn(2, 3, 8), torch.randn(2, 3, 12)
    w, wt = torch.randn(20, 8), torch.randn(20, 12)
    bias = {which: torch.empty(20, device="meta")}
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=rf"^{which} must be on cpu like {which[:7]}_weight, got meta"):
            fused_linear_vgs_loss(h, h, w, ht, ht, wt, backend=backend, **bias)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(chunk_size=2.5), "chunk_size must be a positive int"),
        (dict(chunk_size=True), "chunk_size must be a positive int"),
        (dict(backend="x"), "backend must be one of"),
        (dict(temperature=True), "temperature must be a finite number"),
    ],
)
def test_vgsloss_module_rejects_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VGSLoss(**kwargs)


def test_misspelt_keywords_are_type_errors_that_name_the_caller():
    with pytest.raises(TypeError, match=r"VGSLoss\(\) got an unexpected keyword argument 'alpah'; did you mean 'alpha'"):
        VGSLoss(alpah=1.0)
    with pytest.raises(TypeError, match=r"VGSLoss\(\) got an unexpected keyword argument 'student_bias'"):
        VGSLoss(student_bias=None)
    logits = [torch.randn(2, 5) for _ in range(4)]
    with pytest.raises(TypeError, match=r"vgs_loss\(\) got an unexpected keyword argument 'temprature'; did you mean"):
        vgs_loss(*logits, temprature=2.0)
    h, w = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match=r"VGSLoss.forward: .*'alpha'.*constructor"):
        VGSLoss()(h, h, w, h, h, w, alpha=1.0)
