"""The chunked fused-linear path never allocates a tensor with B*T*V or more elements."""

import pytest
import torch
from helpers import MODES
from torch.utils._python_dispatch import TorchDispatchMode

from vgs_kernels import fused_linear_vgs_loss


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
