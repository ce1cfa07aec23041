"""Row functions from the compiled extension ``vgs_kernels._C`` (built from csrc/ by pip install).

Importing this module raises ImportError, with the reason, when the extension is not built.
"""

from __future__ import annotations

try:
    from .. import _C  # noqa: F401  (registers the torch.ops.vgs_kernels operators)
except ImportError as exc:  # pure-Python install: no compiler or VGS_BUILD_EXT=0
    raise ImportError(f"vgs_kernels._C is not built ({exc})") from exc


def rows_fn(device: str):
    raise ImportError(f"the {device} row kernel of vgs_kernels._C is not implemented yet")
