"""The GEMMs of the lm_head gradients: fp32 results and in-place fp32 accumulation from bf16 / fp16 operands
(tensor cores on CUDA), whatever the torch and the device offer; each accumulation reports its path to
:mod:`vgs_kernels.hooks`."""

from __future__ import annotations

import torch

from . import hooks


def on_gpu(x: torch.Tensor | torch.device) -> bool:
    """Whether a tensor (or device) is on a CUDA device: tensor-core GEMMs with fp32 outputs, a
    chunk budget from free memory (always True inside ``hooks.simulate_gpu``)."""
    if hooks.simulated_free_bytes() is not None:
        return True
    return (x.type if isinstance(x, torch.device) else x.device.type) == "cuda"


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as an fp32 tensor, for a small product ([chunk, H]: the hidden-state gradient).

    On CUDA with a bf16/fp16 ``b``, ``a`` is rounded to ``b``'s dtype (a no-op for the driver's
    gradients, already in that dtype) and the product is accumulated and returned in fp32, never
    rounded to bf16/fp16 (``torch.mm(..., out_dtype=torch.float32)``). On the CPU, operands of one
    bf16/fp16 dtype are multiplied in that dtype and the product upcast (upcasting ``b``, a weight,
    would copy it); other operands are upcast to fp32 and multiplied in fp32.
    """
    low = (torch.bfloat16, torch.float16)
    if on_gpu(a) and b.dtype in low:
        return _mm_low_precision_fp32_out(a.to(b.dtype), b)
    if a.dtype == b.dtype and a.dtype in low:
        return (a @ b).float()
    return a.float() @ b.float()


def accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> None:
    """``out = beta * out + alpha * (a @ b)`` in place (``beta`` 1: accumulate; 0: write, ``out`` not read,
    whatever it holds), for the fp32 (fp64) weight gradient ``out`` [V, H] and the chunk's operands ``a``
    [V, chunk] (the logit gradient, transposed) and ``b`` [chunk, H].

    No [V, H]-sized temporary: operands of ``out``'s dtype go to ``addmm_``; bf16/fp16 operands on
    CUDA to ``torch.addmm(out, a, b, out_dtype=torch.float32, out=out)`` (tensor cores, fp32
    accumulation; on a torch whose addmm refuses an fp32 ``out`` with bf16/fp16 operands -- before
    2.10 -- or with ``ADDMM_FP32_OUT = False``, in slabs of ``ACCUMULATE_SLAB_ROWS`` rows through
    ``torch.mm(out_dtype=torch.float32)``); on the CPU both (chunk-sized) operands are upcast to fp32 for
    ``addmm_`` (or slabs with ``ADDMM_FP32_OUT = False``). Reports the path taken to ``vgs_kernels.hooks``.
    """
    low = (torch.bfloat16, torch.float16)
    if a.dtype == out.dtype and b.dtype == out.dtype:
        path = "addmm"
        out.addmm_(a, b, alpha=alpha, beta=beta)
    elif a.dtype == b.dtype and a.dtype in low and (on_gpu(out) or ADDMM_FP32_OUT is False):
        path = _addmm_low_precision_fp32_out(out, a, b, alpha, beta)
    else:
        path = "upcast"
        out.addmm_(a.to(out.dtype), b.to(out.dtype), alpha=alpha, beta=beta)
    if hooks.active():
        hooks.emit("accumulate", path=path, shape=tuple(out.shape), k=a.shape[1], dtype=str(a.dtype), beta=beta)


# Rows of ``out`` per slab in accumulate_mm's fallback (an fp32 [slab, H] temporary: 64 MiB at H = 2048).
ACCUMULATE_SLAB_ROWS = 8192
# Whether torch.addmm(out_fp32, a_bf16, b_bf16, out_dtype=torch.float32, out=out_fp32) is used (torch >= 2.10
# on CUDA): None until the first call tries it, then True or False; set False to force the slab fallback
# (also on the CPU, with bf16 / fp16 operands: how the checks exercise it without a GPU).
ADDMM_FP32_OUT: bool | None = None


def _addmm_low_precision_fp32_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float,
                                  beta: float = 1.0) -> str:
    """The bf16 / fp16 accumulation of ``accumulate_mm``; returns the path taken."""
    global ADDMM_FP32_OUT
    if ADDMM_FP32_OUT is not False:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, alpha=alpha, beta=beta, out=out)
        except (TypeError, RuntimeError) as exc:
            # once the overload has worked, or when out of memory, a failure is a real error
            if ADDMM_FP32_OUT or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            ADDMM_FP32_OUT = False
        else:
            ADDMM_FP32_OUT = True
            return "addmm_fp32_out"
    for r0 in range(0, out.shape[0], ACCUMULATE_SLAB_ROWS):
        r1 = min(r0 + ACCUMULATE_SLAB_ROWS, out.shape[0])
        if beta == 0:
            torch.mul(_mm_low_precision_fp32_out(a[r0:r1], b), alpha, out=out[r0:r1])
        else:
            out[r0:r1].add_(_mm_low_precision_fp32_out(a[r0:r1], b), alpha=alpha)
    return "slabs"


def _mm_low_precision_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of two bf16/fp16 tensors with an fp32 result: ``torch.mm(out_dtype=fp32)`` on CUDA (torch >= 2.8),
    ``a.float() @ b.float()`` elsewhere (the CPU has no such overload)."""
    return torch.mm(a, b, out_dtype=torch.float32) if on_gpu(a) else a.float() @ b.float()
