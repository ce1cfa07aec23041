"""Shared test utilities: random VGS inputs and tensor comparison with useful messages."""

from __future__ import annotations

import os

import pytest
import torch

MODES = ("standard", "vgs", "adaptive", "language")
# (rtol, atol as a fraction of the largest expected value) for backend-vs-reference comparisons
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def run_logits(backend, logits, mask, **kw):
    """vgs_loss on clones of ``logits`` (student pair requiring grad), backward; (out, grad_zs, grad_zsp)."""
    from vgs_kernels import vgs_loss

    zs, zsp, zt, ztp = (z.clone() for z in logits)
    zs.requires_grad_()
    zsp.requires_grad_()
    out = vgs_loss(zs, zsp, zt, ztp, mask, backend=backend, return_per_token=True, **kw)
    out.loss.backward()
    return out, zs.grad, zsp.grad


def ragged_mask(b: int, t: int, seed: int = 0) -> torch.Tensor:
    """[b, t] bool with ragged valid lengths and sequence 1 empty."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, :2] = True
    mask[1] = False
    if b > 2:
        mask[2, t // 2 :] = False
    return mask


def random_logits(b, t, v, dtype=torch.float32, seed=0, scale=2.0, v_teacher=None):
    g = torch.Generator().manual_seed(seed)
    vt = v_teacher or v
    shapes = ((b, t, v), (b, t, v), (b, t, vt), (b, t, vt))
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def assert_close(actual, expected, rtol, atol_frac, what=""):
    """|a - e| <= atol_frac * max|e| + rtol * |e| elementwise; None counts as zeros."""
    if actual is None and expected is None:
        return
    if actual is None:
        actual = torch.zeros_like(expected)
    if expected is None:
        expected = torch.zeros_like(actual)
    a, e = actual.double().cpu(), expected.double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol_frac * max(scale, 1e-12) + 1e-12, msg=lambda m: f"{what}: {m}")


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_params(names=("torch", "cpu", "triton")):
    """pytest params of the row backends ``names`` on CPU tensors (Triton in its interpreter), each skipped
    with the reason when it is unavailable here."""
    return [pytest.param(device_name[1], id=device_name[1], marks=p.marks)
            for p in row_cases(cpu=names, cuda=()) for device_name in [p.values]]


def row_cases(cpu=("torch", "cpu"), cuda=("torch", "triton", "cuda")):
    """pytest params (device, backend) of the row backends: the CPU ones, and on a machine with a GPU
    the CUDA ones (``triton`` compiled: run the session with ``VGS_TRITON_TEST_DEVICE=cuda``, as
    ``make gpu-check`` does, else Triton interprets and is skipped here)."""
    from vgs_kernels.backends import backends, is_available

    status = backends()
    out = []
    for device, names in (("cpu", cpu), ("cuda", cuda)):
        for name in names:
            why = None
            if device == "cuda" and not torch.cuda.is_available():
                why = "no CUDA device"
            elif not is_available(status.get(name, "")):
                why = f"{name}: {status.get(name)}"
            elif name == "triton" and device == "cuda" and _interpreting_triton():
                why = "Triton is interpreting (TRITON_INTERPRET=1); compiled Triton: VGS_TRITON_TEST_DEVICE=cuda"
            elif name == "triton" and device == "cpu" and not _interpreting_triton():
                why = "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
            marks = [pytest.mark.skip(reason=why)] if why else []
            out.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return out
