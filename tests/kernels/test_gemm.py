"""vgs_kernels.gemm: the fp32-output GEMMs of the lm_head gradients (mm_fp32) and the in-place fp32 accumulation
of the weight gradient (accumulate_mm) on every path: CUDA's out_dtype overloads, the slab fallback of a torch
whose addmm refuses an fp32 out with bf16 / fp16 operands, and the CPU's upcast."""

import pytest
import torch

from vgs_kernels import gemm


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


def test_cpu_and_fp32_operands_never_use_the_overload(monkeypatch):
    old = _OldMM()
    monkeypatch.setattr(torch, "mm", old)
    a, b = _operands()
    out = gemm.mm_fp32(a.float(), b)
    assert out.dtype == torch.float32 and old.out_dtype_calls == 0
    torch.testing.assert_close(out, a.float() @ b.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mm_fp32_matches_the_upcast_product():
    a, b = (t.cuda() for t in _operands())
    out = gemm.mm_fp32(a.float(), b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-5, atol=1e-5)


# ---- in-place fp32 accumulation of the weight gradient (accumulate_mm) ----

class _OldAddmm:
    """torch.addmm as on torch < 2.10: an fp32 ``self``/``out`` with bf16/fp16 operands is refused."""

    def __init__(self):
        self.real, self.refused = torch.addmm, 0

    def __call__(self, *args, out_dtype=None, **kw):
        if out_dtype is not None:
            self.refused += 1
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        return self.real(*args, **kw)


def _mm_with_out_dtype(a, b, out_dtype=None):
    return a.float() @ b.float() if out_dtype is not None else a @ b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_addmm_refusing_fp32_out_falls_back_to_bounded_slabs(monkeypatch, dtype):
    monkeypatch.setattr(gemm, "ADDMM_FP32_OUT", None)
    monkeypatch.setattr(gemm, "ACCUMULATE_SLAB_ROWS", 4)
    old = _OldAddmm()
    monkeypatch.setattr(torch, "addmm", old)
    monkeypatch.setattr(torch, "mm", _mm_with_out_dtype)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 3, generator=g).to(dtype), torch.randn(3, 5, generator=g).to(dtype)
    out = torch.randn(10, 5, generator=g)
    want = out + 0.25 * (a.float() @ b.float())
    ptr = out.data_ptr()
    for _ in range(2):
        gemm._addmm_low_precision_fp32_out(out, a, b, 0.125)
    torch.testing.assert_close(out, want)
    assert out.data_ptr() == ptr and old.refused == 1  # in place; the refusal is remembered


def test_addmm_with_fp32_out_is_used_in_place(monkeypatch):
    monkeypatch.setattr(gemm, "ADDMM_FP32_OUT", None)
    calls = []

    def addmm(self, a, b, *, out_dtype=None, alpha=1.0, beta=1.0, out=None):
        calls.append((out_dtype, out is self))
        return out.mul_(beta).add_(a.float() @ b.float(), alpha=alpha)

    monkeypatch.setattr(torch, "addmm", addmm)
    a, b = _operands()
    out = torch.zeros(6, 7)
    gemm._addmm_low_precision_fp32_out(out, a, b, 2.0)
    torch.testing.assert_close(out, 2.0 * (a.float() @ b.float()))
    assert calls == [(torch.float32, True)] and gemm.ADDMM_FP32_OUT is True


def test_cpu_accumulate_never_forms_an_out_sized_temporary():
    """CPU, bf16 operands: upcast the two chunk-sized operands, accumulate in place (no [V, H] temp)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and func is not torch.ops.aten.addmm_.default:
                self.shapes.append(tuple(out.shape))
            return out

    V, c, H = 50, 4, 12
    out = torch.zeros(V, H)
    a = torch.randn(c, V).bfloat16().t()
    b = torch.randn(c, H).bfloat16()
    with Shapes() as rec:
        gemm.accumulate_mm(out, a, b, 0.5)
    torch.testing.assert_close(out, 0.5 * (a.float() @ b.float()))
    assert (V, H) not in rec.shapes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_accumulate_is_in_place_and_fp32_accurate(dtype):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, 64, generator=g), torch.randn(64, 40, generator=g)
    out = torch.randn(300, 40, generator=g).cuda()
    want = out.cpu() + 0.5 * (a.to(dtype).float() @ b.to(dtype).float())
    ptr = out.data_ptr()
    from vgs_kernels import hooks

    with hooks.observe(rec := hooks.Recorder()):
        gemm.accumulate_mm(out, a.to(dtype).cuda(), b.to(dtype).cuda(), 0.5)
    assert out.data_ptr() == ptr and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-4)
    # torch >= 2.10 accumulates in place in one GEMM; the slab fallback is for older torches only
    paths = [e["path"] for e in rec.of("accumulate")]
    want_path = "addmm_fp32_out" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "slabs"
    assert paths == [want_path], paths


def test_forced_slab_fallback_on_the_cpu_is_reported(monkeypatch):
    from vgs_kernels import hooks

    monkeypatch.setattr(gemm, "ADDMM_FP32_OUT", False)
    monkeypatch.setattr(gemm, "ACCUMULATE_SLAB_ROWS", 4)
    a, b = _operands()
    out = torch.zeros(6, 7)
    with hooks.observe(rec := hooks.Recorder()):
        gemm.accumulate_mm(out, a, b, 2.0)
    torch.testing.assert_close(out, 2.0 * (a.float() @ b.float()))
    assert [e["path"] for e in rec.of("accumulate")] == ["slabs"]
