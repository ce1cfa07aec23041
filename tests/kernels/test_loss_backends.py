"""The row backends (`torch` and `cpu` on CPU tensors; `torch`, `triton` and `cuda` on CUDA tensors when a
GPU is present) against the materialised `reference`."""

import itertools

import pytest
import torch
from helpers import MODES, TOL, assert_close, ragged_mask, random_logits, row_cases, run_logits

from vgs_kernels import fused_linear_vgs_loss, vgs_loss

# Every row backend that runs at full speed, per device: torch and cpu on CPU tensors (triton runs
# in its interpreter there: tests/kernels/test_triton.py covers it on smaller shapes); torch, triton
# (compiled) and cuda on CUDA tensors when a GPU is present.
ROW_CASES = row_cases()


GRID = [  # vocab_size < V needs V > 1
    c for c in itertools.product(MODES, ("sequence", "token"), (1.0, 0.7), (1, 97, 1000), (False, True))
    if not (c[3] == 1 and c[4])
]


@pytest.mark.parametrize("device,backend", ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,reduction,temperature,V,slice_vocab", GRID)
def test_vgs_loss_matches_reference(mode, reduction, temperature, V, slice_vocab, dtype, device, backend):
    logits = random_logits(3, 6, V, dtype, seed=V)
    mask = ragged_mask(3, 6)
    kw = dict(mode=mode, reduction=reduction, temperature=temperature,
              vocab_size=V - V // 7 - 1 if slice_vocab else None)
    ref, ref_gs, ref_gsp = run_logits("reference", logits, mask, **kw)
    got, gs, gsp = run_logits(backend, [z.to(device) for z in logits], mask.to(device), **kw)
    rtol, atol = TOL[dtype]
    assert_close(got.loss.detach(), ref.loss.detach(), rtol, atol, "loss")
    assert_close(gs, ref_gs, rtol, atol, "grad student_logits")
    assert_close(gsp, ref_gsp, rtol, atol, "grad student_text_logits")
    assert gs.dtype == dtype
    for k in ref.per_token:
        assert_close(got.per_token[k], ref.per_token[k], rtol, atol, f"per_token[{k}]")
    for k in ref.metrics:
        assert got.metrics[k] == pytest.approx(ref.metrics[k], rel=rtol, abs=1e-6, nan_ok=True), k
    if slice_vocab:  # ids beyond vocab_size get no gradient
        assert torch.all(gs[..., kw["vocab_size"]:] == 0)


FUSED_GRID = list(itertools.product(MODES, ("sequence", "token"), (1.0, 0.7), (1, 97, 1000)))


def _run_fused(backend, tensors, mask, chunk_size=None, device="cpu", **kw):
    hs, hsp, ws, bs, ht, htp, wt, bt = (t.clone().to(device) for t in tensors)
    mask = None if mask is None else mask.to(device)
    for t in (hs, hsp, ws, bs):
        t.requires_grad_()
    out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, mask, student_bias=bs, teacher_bias=bt,
                                backend=backend, chunk_size=chunk_size, **kw)
    out.loss.backward()
    return out, [t.grad for t in (hs, hsp, ws, bs)]


def fused_inputs(b, t, v, hs_dim, ht_dim, dtype, seed, v_teacher=None):
    g = torch.Generator().manual_seed(seed)
    vt = v_teacher or v

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    return [r(b, t, hs_dim), r(b, t, hs_dim), r(v, hs_dim, scale=0.5), r(v, scale=0.5),
            r(b, t, ht_dim), r(b, t, ht_dim), r(vt, ht_dim, scale=0.5), r(vt, scale=0.5)]


@pytest.mark.parametrize("device,backend", ROW_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,reduction,temperature,V", FUSED_GRID)
def test_fused_linear_matches_reference(mode, reduction, temperature, V, dtype, device, backend):
    # student and teacher hidden sizes differ; the teacher head has 3 extra rows; vocab_size < V
    # slices both heads (V = 1 keeps its single id).
    tensors = fused_inputs(3, 5, V, 16, 24, dtype, seed=V, v_teacher=V + 3)
    mask = ragged_mask(3, 5)
    kw = dict(mode=mode, reduction=reduction, temperature=temperature, vocab_size=max(1, V - V // 7))
    ref, ref_grads = _run_fused("reference", tensors, mask, **kw)
    got, grads = _run_fused(backend, tensors, mask, chunk_size=4, device=device, **kw)
    rtol, atol = TOL[dtype]
    if dtype == torch.bfloat16:  # logits themselves are bf16 GEMM outputs on both sides
        rtol, atol = 5e-2, 5e-2
    assert_close(got.loss.detach(), ref.loss.detach(), rtol, atol, "loss")
    for name, g, r in zip(("student_hidden", "student_text_hidden", "student_weight", "student_bias"), grads, ref_grads):
        assert_close(g, r, rtol, atol, f"grad {name}")
        assert g.dtype == dtype


@pytest.mark.parametrize("mode", MODES)
def test_fused_chunking_does_not_change_the_result(mode):
    tensors = fused_inputs(2, 7, 50, 8, 12, torch.float32, seed=3)
    mask = ragged_mask(2, 7)
    results = [_run_fused("torch", tensors, mask, chunk_size=c, mode=mode) for c in (1, 3, 64)]
    for out, grads in results[1:]:
        assert_close(out.loss.detach(), results[0][0].loss.detach(), 1e-5, 1e-6, "loss")
        for g, g0 in zip(grads, results[0][1]):
            assert_close(g, g0, 1e-5, 1e-6, "grad")


@pytest.mark.parametrize("device,backend", ROW_CASES)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_detach_target_prior_and_fixed_threshold(mode, detach, device, backend):
    logits = random_logits(2, 8, 40, seed=5)
    mask = ragged_mask(2, 8)
    thr = (0.1, 0.5) if mode == "adaptive" else 0.3
    kw = dict(mode=mode, detach_target_prior=detach, threshold=thr, gamma=0.41, alpha=1.5, beta=0.2)
    ref, ref_gs, ref_gsp = run_logits("reference", logits, mask, **kw)
    got, gs, gsp = run_logits(backend, [z.to(device) for z in logits], mask.to(device), **kw)
    assert_close(got.loss.detach(), ref.loss.detach(), 1e-5, 1e-6, "loss")
    assert_close(gs, ref_gs, 1e-5, 1e-6, "grad student_logits")
    assert_close(gsp, ref_gsp, 1e-5, 1e-6, "grad student_text_logits")
    assert got.metrics["threshold"] == pytest.approx(thr[1] if mode == "adaptive" else thr)


def test_two_dimensional_logits_are_one_sequence():
    zs, zsp, zt, ztp = random_logits(1, 9, 30, seed=2)
    flat = [z[0] for z in (zs, zsp, zt, ztp)]
    a = vgs_loss(*flat, backend="torch", return_per_token=True)
    b = vgs_loss(zs, zsp, zt, ztp, backend="torch")
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    assert a.per_token["std"].shape == (9,)


def test_all_false_mask_gives_zero_loss_and_zero_grads():
    for backend in ("reference", "torch"):
        logits = random_logits(2, 4, 11)
        mask = torch.zeros(2, 4, dtype=torch.bool)
        out, gs, gsp = run_logits(backend, logits, mask)
        assert out.loss.item() == 0.0
        assert torch.count_nonzero(gs) == 0
        assert gsp is None or torch.count_nonzero(gsp) == 0
        tensors = fused_inputs(2, 4, 11, 6, 5, torch.float32, seed=1)
        out, grads = _run_fused(backend, tensors, mask)
        assert out.loss.item() == 0.0
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_no_grad_forward_returns_the_same_loss():
    logits = random_logits(2, 5, 20)
    with torch.no_grad():
        a = vgs_loss(*logits, backend="torch")
    b = vgs_loss(*logits, backend="reference")
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)


def test_gradcheck_reference_float64():
    logits = random_logits(2, 3, 7, torch.float64, seed=9)
    mask = ragged_mask(2, 3)
    zs, zsp = (z.clone().requires_grad_() for z in logits[:2])
    for mode in MODES:
        def f(a, b, mode=mode):
            return vgs_loss(a, b, logits[2], logits[3], mask, mode=mode, temperature=0.7,
                            detach_target_prior=False, backend="reference").loss
        assert torch.autograd.gradcheck(f, (zs, zsp), eps=1e-6, atol=1e-6)


def test_gradcheck_fused_reference_float64():
    tensors = fused_inputs(2, 3, 9, 4, 5, torch.float64, seed=4)
    hs, hsp, ws, bs = (t.clone().requires_grad_() for t in tensors[:4])
    ht, htp, wt, bt = tensors[4:]

    def f(a, b, w, bias):
        return fused_linear_vgs_loss(a, b, w, ht, htp, wt, student_bias=bias, teacher_bias=bt,
                                     detach_target_prior=False, backend="reference").loss

    # detach_target_prior=False: with the stop-gradient the analytic gradient is, by design,
    # not the derivative of the loss value, which is what gradcheck measures.
    assert torch.autograd.gradcheck(f, (hs, hsp, ws, bs), eps=1e-6, atol=1e-6)
