"""driver.mm_fp32: the fp32-output GEMM of the bf16/fp16 weight gradient works on a torch without
``torch.mm(..., out_dtype=)`` (added around torch 2.8; pyproject allows torch >= 2.4)."""

import pytest
import torch

from vgs_kernels import driver


def _operands(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g).to(dtype), torch.randn(5, 7, generator=g).to(dtype)


class _OldMM:
    """torch.mm as on a torch without the out_dtype overload; counts the calls that pass it."""

    def __init__(self, exc=TypeError):
        self.real, self.exc, self.out_dtype_calls = torch.mm, exc, 0

    def __call__(self, a, b, **kw):
        if "out_dtype" in kw:
            self.out_dtype_calls += 1
            raise self.exc("mm() got an unexpected keyword argument 'out_dtype'")
        return self.real(a, b)


@pytest.mark.parametrize("exc", [TypeError, RuntimeError])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_missing_out_dtype_overload_falls_back_to_fp32(monkeypatch, exc, dtype):
    monkeypatch.setattr(driver, "_mm_out_dtype_ok", None)
    old = _OldMM(exc)
    monkeypatch.setattr(torch, "mm", old)
    a, b = _operands(dtype)
    for _ in range(3):
        out = driver._mm_low_precision_fp32_out(a, b)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, a.float() @ b.float())
    assert old.out_dtype_calls == 1  # tried once, then the decision is cached
    assert driver._mm_out_dtype_ok is False


def test_out_dtype_overload_is_used_when_present(monkeypatch):
    monkeypatch.setattr(driver, "_mm_out_dtype_ok", None)
    calls = []

    def mm(a, b, out_dtype=None):
        calls.append(out_dtype)
        return (a.float() @ b.float()).to(out_dtype)

    monkeypatch.setattr(torch, "mm", mm)
    a, b = _operands()
    out = driver._mm_low_precision_fp32_out(a, b)
    assert out.dtype == torch.float32 and calls == [torch.float32]
    assert driver._mm_out_dtype_ok is True
    # once the overload has worked, a later failure is a real error, not a reason to fall back
    monkeypatch.setattr(torch, "mm", _OldMM(RuntimeError))
    with pytest.raises(RuntimeError):
        driver._mm_low_precision_fp32_out(a, b)


def test_cpu_and_fp32_operands_never_use_the_overload(monkeypatch):
    old = _OldMM()
    monkeypatch.setattr(torch, "mm", old)
    a, b = _operands()
    out = driver.mm_fp32(a.float(), b)
    assert out.dtype == torch.float32 and old.out_dtype_calls == 0
    torch.testing.assert_close(out, a.float() @ b.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mm_fp32_matches_the_upcast_product():
    a, b = (t.cuda() for t in _operands())
    out = driver.mm_fp32(a.float(), b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-5, atol=1e-5)
