"""The chunked fused-linear path never allocates a tensor with B*T*V or more elements."""

import contextlib

import pytest
import torch
from helpers import MODES, assert_close, random_logits
from torch.utils._python_dispatch import TorchDispatchMode

from vgs_kernels import fused_linear_vgs_loss, vgs_loss


class LargestAllocation(TorchDispatchMode):
    """Records the element count of every tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def _inputs(b, t, v, hs, ht):
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(b, t, hs, generator=g, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(b, t, ht, generator=g) for _ in range(2)]
    return student, teacher, torch.randn(v, hs, generator=g, requires_grad=True), torch.randn(v, ht, generator=g)


@pytest.mark.parametrize("mode", MODES)
def test_fused_torch_never_holds_all_logits(mode):
    b, t, v = 4, 32, 2000
    (hs, hsp), (ht, htp), ws, wt = _inputs(b, t, v, 16, 24)
    with LargestAllocation() as rec:
        out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, mode=mode, detach_target_prior=False, backend="torch")
        out.loss.backward()
    assert rec.largest < b * t * v, f"{rec.op} allocated {rec.largest} >= B*T*V = {b * t * v}"
    assert rec.largest <= b * t * v // 2  # the default chunking keeps it at most half the batch


def test_the_recorder_sees_the_reference_materialise_logits():
    # guards the test above: the same recorder must catch a full [B*T, V] allocation
    b, t, v = 2, 16, 500
    (hs, hsp), (ht, htp), ws, wt = _inputs(b, t, v, 8, 8)
    with LargestAllocation() as rec:
        fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, backend="reference").loss.backward()
    assert rec.largest >= b * t * v


class Allocations(TorchDispatchMode):
    """Records (op, shape) of every tensor an aten op returns in fresh storage (not a view or an
    in-place result of one of its inputs), and every op called."""

    def __init__(self):
        super().__init__()
        self.fresh: list[tuple[object, tuple[int, ...]]] = []
        self.ops: list[object] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        inputs = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.fresh.append((func, tuple(t.shape)))
        return out

    def shapes(self, *shapes):
        return [(f, s) for f, s in self.fresh if s in shapes]


def _frozen_inputs(seed=3, bias=True):
    # sizes all distinct so a shape identifies what was allocated: N = 2*8 = 16 rows, V = 50,
    # H_s = 12, H_t = 20
    g = torch.Generator().manual_seed(seed)
    hs, hsp = (torch.randn(2, 8, 12, generator=g) for _ in range(2))
    ht, htp = (torch.randn(2, 8, 20, generator=g) for _ in range(2))
    ws, wt = torch.randn(50, 12, generator=g) * 0.5, torch.randn(50, 20, generator=g) * 0.5
    bs, bt = (torch.randn(50, generator=g) * 0.5 for _ in range(2)) if bias else (None, None)
    return hs, hsp, ws, bs, ht, htp, wt, bt


def _fused(backend, tensors, trainable, record=False, **kw):
    """fused_linear_vgs_loss on clones with requires_grad set for the indices in ``trainable``
    (0..3 = hs, hsp, ws, bs); backward; (grads of hs, hsp, ws, bs, the recorder or None)."""
    hs, hsp, ws, bs, ht, htp, wt, bt = (None if t is None else t.clone() for t in tensors)
    student = [hs, hsp, ws, bs]
    for i in trainable:
        student[i].requires_grad_()
    rec = Allocations() if record else None
    with rec if rec is not None else contextlib.nullcontext():
        out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, student_bias=bs, teacher_bias=bt,
                                    backend=backend, chunk_size=4, **kw)
        out.loss.backward()
    return [None if t is None else t.grad for t in student], rec


@pytest.mark.parametrize("mode", MODES)
def test_frozen_student_weight_gets_no_gradient_work(mode):
    tensors = _frozen_inputs()
    kw = dict(mode=mode, detach_target_prior=False)
    ref, _ = _fused("reference", tensors, (0, 1), **kw)
    got, rec = _fused("torch", tensors, (0, 1), record=True, **kw)
    assert got[2] is None and got[3] is None
    assert_close(got[0], ref[0], 1e-5, 1e-6, "grad student_hidden")
    assert_close(got[1], ref[1], 1e-5, 1e-6, "grad student_text_hidden")
    # no [V, H_s] gradient buffer, no weight-gradient GEMM, no [V] bias-gradient buffer
    assert rec.shapes((50, 12), (50,)) == []
    assert torch.ops.aten.addmm_.default not in rec.ops
    assert rec.shapes((16, 12), (2, 8, 12))  # the hidden gradients are still formed


@pytest.mark.parametrize("mode", MODES)
def test_frozen_student_hidden_gets_no_gradient_work(mode):
    tensors = _frozen_inputs()
    kw = dict(mode=mode, detach_target_prior=False)
    ref, _ = _fused("reference", tensors, (2, 3), **kw)
    got, rec = _fused("torch", tensors, (2, 3), record=True, **kw)
    assert got[0] is None and got[1] is None
    assert_close(got[2], ref[2], 1e-5, 1e-6, "grad student_weight")
    assert_close(got[3], ref[3], 1e-5, 1e-6, "grad student_bias")
    assert rec.shapes((16, 12), (2, 8, 12)) == []  # no [N, H_s] hidden-gradient buffer
    assert torch.ops.aten.addmm_.default in rec.ops  # ... while the weight-gradient GEMM still runs
    assert rec.shapes((50, 12))


def test_frozen_bias_and_one_frozen_hidden_stream():
    tensors = _frozen_inputs()
    ref, _ = _fused("reference", tensors, (1, 2))
    got, rec = _fused("torch", tensors, (1, 2), record=True)
    assert got[0] is None and got[3] is None
    assert_close(got[1], ref[1], 1e-5, 1e-6, "grad student_text_hidden")
    assert_close(got[2], ref[2], 1e-5, 1e-6, "grad student_weight")
    assert rec.shapes((50,)) == []  # no bias-gradient buffer
    assert len(rec.shapes((16, 12))) == 1  # one hidden-gradient buffer, for the text stream


def test_frozen_student_logits_stream_gets_no_gradient_buffer():
    zs, zsp, zt, ztp = random_logits(2, 8, 50, seed=4)
    ref_zsp = zsp.clone().requires_grad_()
    vgs_loss(zs, ref_zsp, zt, ztp, detach_target_prior=False, backend="reference").loss.backward()
    zsp = zsp.clone().requires_grad_()
    with Allocations() as rec:  # the forward forms the gradients
        out = vgs_loss(zs, zsp, zt, ztp, detach_target_prior=False, backend="torch")
    out.loss.backward()
    assert zs.grad is None
    assert_close(zsp.grad, ref_zsp.grad, 1e-5, 1e-6, "grad student_text_logits")
    assert len(rec.shapes((16, 50), (2, 8, 50))) == 1  # the text stream's gradient buffer only


@pytest.mark.parametrize("gated_per_chunk", [1, 2, 4])
def test_one_weight_gradient_gemm_per_chunk_when_the_text_rows_fit(gated_per_chunk):
    """Pass 1 with the predicted gate (exact here: gate=) stacks the chunk's gated text-stream gradient
    rows below the image stream's in one buffer: one weight-gradient GEMM per chunk while they fit the
    half chunk of spare rows (chunk_size=4: 2 rows), two GEMMs per chunk when they do not."""
    tensors = _frozen_inputs()
    gate = torch.zeros(2, 8, dtype=torch.bool)
    gate.view(-1).view(4, 4)[:, :gated_per_chunk] = True
    kw = dict(mode="vgs", gate=gate)
    ref, _ = _fused("reference", tensors, (0, 1, 2, 3), **kw)
    got, rec = _fused("torch", tensors, (0, 1, 2, 3), record=True, **kw)
    for g, r, name in zip(got, ref, ("student_hidden", "student_text_hidden", "student_weight", "student_bias")):
        assert_close(g, r, 1e-5, 1e-6, f"grad {name}")
    gemms = rec.ops.count(torch.ops.aten.addmm_.default)
    assert gemms == (4 if gated_per_chunk <= 2 else 8), gemms
