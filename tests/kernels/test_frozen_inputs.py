"""Frozen student inputs (requires_grad=False) on every row backend: the trainable ones still get
the reference gradient, the frozen ones get none (and, see tests/kernels/test_memory.py, cost no work)."""

import itertools

import pytest
import torch
from helpers import MODES, assert_close, ragged_mask, random_logits, row_cases

from vgs_kernels import fused_linear_vgs_loss, vgs_loss

# the row backends per device (triton: interpreted on CPU tensors, compiled on CUDA ones)
ROW_CASES = row_cases(cpu=("torch", "cpu", "triton"))
# (hs, hsp, ws, bs): which student inputs are trainable; every one frozen at least once
FUSED_TRAINABLE = [(0, 1), (2, 3), (2,), (1, 2), (0, 3), (1,)]


def _logits(backend, logits, mask, trainable, device="cpu", **kw):
    zs, zsp, zt, ztp = (z.clone().to(device) for z in logits)
    mask = mask.to(device)
    for i in trainable:
        (zs, zsp)[i].requires_grad_()
    out = vgs_loss(zs, zsp, zt, ztp, mask, backend=backend, **kw)
    if out.loss.requires_grad:  # the reference's loss in mode="standard" ignores zsp
        out.loss.backward()
    return out.loss.detach(), [zs.grad, zsp.grad]


def _fused(backend, tensors, mask, trainable, device="cpu", **kw):
    hs, hsp, ws, bs, ht, htp, wt, bt = (t.clone().to(device) for t in tensors)
    mask = mask.to(device)
    student = [hs, hsp, ws, bs]
    for i in trainable:
        student[i].requires_grad_()
    out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, mask, student_bias=bs, teacher_bias=bt,
                                backend=backend, chunk_size=3, **kw)
    if out.loss.requires_grad:  # the reference's loss in mode="standard" ignores hsp
        out.loss.backward()
    return out.loss.detach(), [t.grad for t in student]


@pytest.mark.parametrize("device,backend", ROW_CASES)
@pytest.mark.parametrize("mode,detach,trainable", list(itertools.product(MODES, (True, False), ((0,), (1,)))))
def test_frozen_logit_stream(device, backend, mode, detach, trainable):
    logits = random_logits(2, 5, 37, seed=7)
    mask = ragged_mask(2, 5)
    kw = dict(mode=mode, detach_target_prior=detach, quantile=0.5)
    ref_loss, ref = _logits("reference", logits, mask, trainable, **kw)
    loss, got = _logits(backend, logits, mask, trainable, device, **kw)
    assert_close(loss, ref_loss, 1e-5, 1e-6, "loss")
    for i in (0, 1):
        if i in trainable:
            assert_close(got[i], ref[i], 1e-4, 1e-5, f"grad stream {i}")  # None reads as zeros
        else:
            assert got[i] is None


@pytest.mark.parametrize("device,backend", ROW_CASES)
@pytest.mark.parametrize("mode,trainable", list(itertools.product(MODES, FUSED_TRAINABLE)))
def test_frozen_fused_inputs(device, backend, mode, trainable):
    g = torch.Generator().manual_seed(11)
    tensors = [torch.randn(*s, generator=g) * sc for s, sc in (
        ((2, 5, 6), 1.0), ((2, 5, 6), 1.0), ((29, 6), 0.5), ((29,), 0.5),
        ((2, 5, 9), 1.0), ((2, 5, 9), 1.0), ((29, 9), 0.5), ((29,), 0.5))]
    mask = ragged_mask(2, 5)
    kw = dict(mode=mode, detach_target_prior=False, quantile=0.5)
    ref_loss, ref = _fused("reference", tensors, mask, trainable, **kw)
    loss, got = _fused(backend, tensors, mask, trainable, device, **kw)
    assert_close(loss, ref_loss, 1e-5, 1e-6, "loss")
    for i, name in enumerate(("student_hidden", "student_text_hidden", "student_weight", "student_bias")):
        if i in trainable:
            assert_close(got[i], ref[i], 1e-4, 1e-5, f"grad {name}")
        else:
            assert got[i] is None, name


def test_no_grad_mode_computes_no_gradients():
    logits = random_logits(2, 4, 20, seed=1)
    zs = logits[0].clone().requires_grad_()
    with torch.no_grad():
        out = vgs_loss(zs, *logits[1:], backend="torch")
    assert not out.loss.requires_grad
