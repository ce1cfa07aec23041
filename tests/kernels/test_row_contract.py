"""The row contract's padding columns and in-place gradients, on every row backend and device.

``vocab=`` marks columns [vocab, width) as padding (the fused-linear driver runs its GEMMs on the full
lm_head rows): never read (NaN there changes nothing), gradient 0. Gradient buffers may be the logits
themselves (the driver writes the gradients in place, in the logits' dtype). Compared with the torch
row function on the sliced rows, out of place, in fp32.
"""

import pytest
import torch
from helpers import row_cases

from vgs_kernels.backends import resolve, torch_rows

CASES = row_cases(cpu=("torch", "cpu", "triton"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _logits(n, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, width, generator=g) * 2
    z = [(base + torch.randn(n, width, generator=g) * 2).to(dtype) for _ in range(4)]
    return z


def _want(z, coef, vocab, det, tau, grads):
    """torch_rows on the real columns, fp32 buffers, out of place."""
    zr = [x[:, :vocab].float() for x in z]
    n = zr[0].shape[0]
    gs = torch.empty(n, vocab) if grads[0] else None
    gsp = torch.empty(n, vocab) if grads[1] else None
    stats = torch_rows.vgs_rows(*zr, coef, temperature=tau, detach_target_prior=det, grad_zs=gs, grad_zsp=gsp)
    return stats, gs, gsp


def _close(a, b, tol, what):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = max(b.abs().max().item(), 1e-3)
    err = (a - b).abs().max().item()
    assert torch.isfinite(a).all(), f"{what}: non-finite"
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_padding_columns_and_in_place_gradients(device, backend, dtype):
    fn = resolve(backend, torch.device(device)).rows_fn
    n, vocab, width = 5, 290, 300
    coef = torch.rand(n, 3, generator=torch.Generator().manual_seed(2))
    for det, tau, grads in ((True, 1.0, (True, False)), (False, 0.7, (True, True)), (True, 1.0, (False, True))):
        z = _logits(n, width, dtype, seed=3)
        for x in z:
            x[:, vocab:] = float("nan")  # padding: must never be read
        want = _want(z, coef, vocab, det, tau, grads)
        zd = [x.to(device) for x in z]
        gs = zd[0] if grads[0] else None  # in place, in the logits' dtype
        gsp = zd[1] if grads[1] else None
        stats = fn(*zd, coef.to(device), temperature=tau, detach_target_prior=det, grad_zs=gs, grad_zsp=gsp,
                   vocab=vocab)
        tol = TOL[dtype]
        _close(stats, want[0], 2e-5 if dtype == torch.float32 else 1e-4, f"stats det={det}")
        for g, w, name in ((gs, want[1], "grad_zs"), (gsp, want[2], "grad_zsp")):
            if g is None:
                continue
            assert g.dtype == dtype
            _close(g[:, :vocab], w, tol, f"{name} det={det} grads={grads}")
            assert (g[:, vocab:] == 0).all(), f"{name}: padding columns must get gradient 0"


@pytest.mark.parametrize("device,backend", CASES)
def test_aliased_text_pair_in_place(device, backend):
    """The gated pass of mode='vgs': (zsp, zsp, ztp, ztp) with the gradient written into zsp."""
    fn = resolve(backend, torch.device(device)).rows_fn
    n, vocab, width = 4, 250, 256
    z = _logits(n, width, torch.bfloat16, seed=5)
    zsp, ztp = z[1], z[3]
    coef = torch.rand(n, 3) * torch.tensor([1.0, 0.0, 0.0])
    want = _want([zsp, zsp, ztp, ztp], coef, vocab, True, 1.0, (True, False))
    a, b = zsp.to(device), ztp.to(device)
    stats = fn(a, a, b, b, coef.to(device), temperature=1.0, detach_target_prior=True, grad_zs=a, vocab=vocab)
    _close(stats, want[0], 1e-4, "stats")
    _close(a[:, :vocab], want[1], 2e-2, "grad")
    assert (a[:, vocab:] == 0).all()


@pytest.mark.parametrize("device,backend", CASES)
def test_fp32_gradient_buffers_for_half_logits(device, backend):
    """Gradient buffers of another dtype than the logits (here fp32 for fp16 logits) are still filled."""
    fn = resolve(backend, torch.device(device)).rows_fn
    n, vocab, width = 3, 140, 150
    z = _logits(n, width, torch.float16, seed=7)
    coef = torch.rand(n, 3)
    want = _want(z, coef, vocab, False, 0.7, (True, True))
    zd = [x.to(device) for x in z]
    gs = torch.full((n, width), float("nan"), device=device)
    gsp = torch.full((n, width), float("nan"), device=device)
    fn(*zd, coef.to(device), temperature=0.7, detach_target_prior=False, grad_zs=gs, grad_zsp=gsp, vocab=vocab)
    _close(gs[:, :vocab], want[1], 1e-4, "grad_zs")
    _close(gsp[:, :vocab], want[2], 1e-4, "grad_zsp")
    assert (gs[:, vocab:] == 0).all() and (gsp[:, vocab:] == 0).all()
