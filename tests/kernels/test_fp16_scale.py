"""fp16 logit gradients at a realistic number of rows.

The fused-linear path writes each chunk's logit gradients in place, in the logits' dtype. The
per-row coefficients are ~1/N (the reduction weights), which in fp16 would push most gradient entries
into the subnormal range (or to 0) before the backward GEMMs; the driver scales them by a power of
two before rounding and undoes it in the fp32 accumulation (``driver.grad_scale``). Checked at
N = 4096 rows against the reference computed in fp64 on the same (fp16-valued) inputs.
"""

import pytest
import torch
from helpers import assert_close, row_cases

from vgs_kernels import driver, fused_linear_vgs_loss

ROWS_B, ROWS_T = 8, 512  # N = 4096 response tokens, 512 per sequence: coefficients ~1/4096
# row backends per device: the Triton interpreter is too slow for 4096 rows, so triton runs on CUDA only
CASES = row_cases(cpu=("torch", "cpu"), cuda=("torch", "triton", "cuda"))


def _inputs(device, seed=0, V=256, hs=32, ht=48):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).half().to(device)

    return [r(ROWS_B, ROWS_T, hs), r(ROWS_B, ROWS_T, hs), r(V, hs, scale=0.3), r(ROWS_B, ROWS_T, ht),
            r(ROWS_B, ROWS_T, ht), r(V, ht, scale=0.3)]


def _grads(backend, tensors, dtype=None, **kw):
    hs, hsp, ws, ht, htp, wt = (t.detach().clone() for t in tensors)
    if dtype is not None:
        hs, hsp, ws, ht, htp, wt = (t.to(dtype) for t in (hs, hsp, ws, ht, htp, wt))
    for t in (hs, hsp, ws):
        t.requires_grad_()
    # the paper's gamma and beta: the language term's coefficients are ~0.004 / N; every row gated
    # (threshold below every VDS) so that fp16 rounding cannot flip a row's gate against the reference
    out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, backend=backend, threshold=-1.0, gamma=0.41, **kw)
    out.loss.backward()
    return out.loss.detach(), [hs.grad, hsp.grad, ws.grad]


FP16_SUBNORMAL_STEP = 2.0**-24  # the spacing of fp16 values below 2^-14


def _check(got, ref, tol):
    """|got - ref| <= tol * (|ref| + max|ref|) + one fp16 subnormal step: the gradients are returned
    in fp16, and the text stream's (~1e-6: beta * gamma / N) are subnormal there."""
    for a, b, name in zip(got, ref, ("student_hidden", "student_text_hidden", "student_weight")):
        assert a.dtype == torch.float16
        a, b = a.double().cpu(), b.double().cpu()
        atol = tol * b.abs().max().item() + FP16_SUBNORMAL_STEP
        torch.testing.assert_close(a, b, rtol=tol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device,backend", CASES)
def test_fp16_gradients_match_the_fp64_reference_at_4096_rows(device, backend):
    tensors = _inputs(device)
    ref_loss, ref = _grads("reference", tensors, dtype=torch.float64)
    loss, got = _grads(backend, tensors, chunk_size=1024)
    assert_close(loss.double().cpu(), ref_loss.cpu(), 1e-3, 1e-3, "loss")
    _check(got, ref, 1e-2)


def test_without_the_scale_fp16_gradients_underflow(monkeypatch):
    """Guards the test above: with the scale forced to 1 the same comparison fails."""
    tensors = _inputs("cpu")
    _, ref = _grads("reference", tensors, dtype=torch.float64)
    monkeypatch.setattr(driver, "grad_scale", lambda coef, dtype: 1.0)
    _, got = _grads("torch", tensors, chunk_size=1024)
    with pytest.raises(AssertionError):
        _check(got, ref, 1e-2)


def test_grad_scale_is_a_power_of_two_for_fp16_only():
    coef = torch.tensor([[1e-4, 2e-4, 0.0], [3e-5, 0.0, 1e-6]])
    s = driver.grad_scale(coef, torch.float16)
    assert s == 2.0 ** 12 and 1.0 <= 3e-4 * s < 2.0  # the largest row sum of |coef| lands in [1, 2)
    assert driver.grad_scale(coef, torch.bfloat16) == 1.0
    assert driver.grad_scale(coef, torch.float32) == 1.0
    assert driver.grad_scale(torch.zeros(2, 3), torch.float16) == 1.0
