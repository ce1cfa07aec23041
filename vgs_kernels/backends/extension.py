"""Row functions from the compiled extension ``vgs_kernels._C`` (built from csrc/ by pip install).

The extension registers ``torch.ops.vgs_kernels.vgs_rows`` (schema below) with a CPU kernel
(C++, parallel over rows, vectorised; AVX-512 / AVX2 / baseline chosen at run time), a Meta kernel
(shapes only, so fake tensors and torch.compile work) and, when built against a CUDA torch with a
CUDA toolkit, a CUDA kernel (one thread block per row)::

    vgs_rows(Tensor zs, Tensor zsp, Tensor zt, Tensor ztp, Tensor coef, float temperature,
             bool detach_target_prior, Tensor(a!)? grad_zs=None, Tensor(b!)? grad_zsp=None,
             int? vocab=None) -> Tensor

The CUDA kernel writes gradients in the logits' dtype when the buffers have it; the CPU kernel
writes fp32 (fp64) and copies into buffers of another dtype.

It follows the row contract of :mod:`vgs_kernels.backends.torch_rows`.
Importing this module raises ImportError, with the reason, when the extension is not built.
"""

from __future__ import annotations

from pathlib import Path

import torch

# What setup.py recorded about the build ("built: ...", "skipped: ...", "failed: ..."), if anything.
BUILD_RECORD = Path(__file__).resolve().parents[1] / "_C_build.txt"


def _not_available(exc: ImportError) -> str:
    """Why vgs_kernels._C cannot be used: the build record when the build skipped or failed it, else
    what the import said."""
    record = BUILD_RECORD.read_text().strip() if BUILD_RECORD.is_file() else None
    if record and not record.startswith("built"):
        return f"vgs_kernels._C was not built: {record}"
    if isinstance(exc, ModuleNotFoundError):
        where = ("the build record says it was built, yet the module is missing" if record else
                 "no build was attempted here (a source checkout without `pip install`, or a wheel built "
                 "without it)")
        return f"vgs_kernels._C is not installed ({where}); install with `pip install --no-build-isolation .`"
    return (f"vgs_kernels._C is installed but does not load ({exc}); it was probably built against another "
            "torch: reinstall with `pip install --no-build-isolation .`")


try:
    from .. import _C  # registers the torch.ops.vgs_kernels operators
except ImportError as exc:  # pure-Python install: VGS_BUILD_EXT=0, no torch at build time, a failed build
    raise ImportError(_not_available(exc)) from exc

WITH_CUDA = bool(getattr(_C, "WITH_CUDA", 0))
CPU_ISA = str(getattr(_C, "CPU_ISA", "unknown"))


def rows_fn(device: str):
    """The extension's row function for ``device`` ("cpu" or "cuda"); ImportError if not built for it."""
    if device == "cuda" and not WITH_CUDA:
        raise ImportError(
            "vgs_kernels._C was built without CUDA (needs a CUDA build of torch and a CUDA toolkit "
            "at install time)"
        )
    if device not in ("cpu", "cuda"):
        raise ImportError(f"vgs_kernels._C has no {device} kernel")
    # the operator itself: its schema's names and defaults are the row contract's
    return torch.ops.vgs_kernels.vgs_rows.default
