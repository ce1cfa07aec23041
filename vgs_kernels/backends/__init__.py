"""Backend registry: which row kernels exist here, and which one ``backend="auto"`` picks.

A backend is a row function following the contract in :mod:`vgs_kernels.backends.torch_rows`
plus the devices it runs on. ``reference`` is not a row kernel: it materialises everything and
differentiates with autograd (see :mod:`vgs_kernels.reference`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

NAMES = ("auto", "reference", "torch", "triton", "cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    rows_fn: Callable[..., torch.Tensor] | None  # None for "reference"
    devices: tuple[str, ...]
    # fp32 [chunk, V] temporaries the row function allocates itself (the driver's chunk budget
    # adds them to the logit buffers): the torch kernel materialises ~14, a streaming kernel none.
    chunk_temps: int = 0


def _load_torch() -> Backend:
    from .torch_rows import vgs_rows

    return Backend("torch", vgs_rows, ("cpu", "cuda"), chunk_temps=14)


def _load_triton() -> Backend:
    from .triton_rows import vgs_rows  # ImportError when triton (or the module) is missing

    # Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1, used by the tests).
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return Backend("triton", vgs_rows, ("cpu", "cuda") if interp else ("cuda",))


def _load_extension(device: str) -> Callable[[], Backend]:
    def load() -> Backend:
        from . import extension  # raises ImportError with the reason when vgs_kernels._C is absent

        return Backend(device, extension.rows_fn(device), (device,))

    return load


_LOADERS: dict[str, Callable[[], Backend]] = {
    "torch": _load_torch,
    "triton": _load_triton,
    "cpu": _load_extension("cpu"),
    "cuda": _load_extension("cuda"),
}
_cache: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend, or a string saying why it is unavailable."""
    if name not in _cache:
        try:
            _cache[name] = _LOADERS[name]()
        except (ImportError, OSError, RuntimeError) as exc:
            _cache[name] = f"{type(exc).__name__}: {exc}"
    return _cache[name]


def backends() -> dict[str, str]:
    """Every backend name -> "available" or the reason it is not (e.g. extension not built)."""
    out = {"reference": "available"}
    for name in _LOADERS:
        loaded = _load(name)
        if isinstance(loaded, str):
            out[name] = f"unavailable ({loaded})"
        elif name == "cuda" and not torch.cuda.is_available():
            out[name] = "unavailable (no CUDA device)"
        else:
            out[name] = "available"
    return out


def resolve(name: str, device: torch.device) -> Backend | None:
    """The backend to run on ``device`` for the name the caller gave; None means ``reference``.

    Raises ValueError for unknown names and for backends unavailable here or on that device.
    """
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name == "reference":
        return None
    if name == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for candidate in order:
            loaded = _load(candidate)
            if not isinstance(loaded, str) and device.type in loaded.devices:
                return loaded
        raise ValueError(f"no backend runs on {device}; backends: {backends()}")
    loaded = _load(name)
    if isinstance(loaded, str):
        avail = [k for k, v in backends().items() if v == "available"]
        raise ValueError(
            f"backend={name!r} is unavailable: {loaded}. Available backends: {avail}"
        )
    if device.type not in loaded.devices:
        raise ValueError(
            f"backend={name!r} runs on {loaded.devices} tensors, got tensors on {device}"
            + (" (set TRITON_INTERPRET=1 to run triton on CPU)" if name == "triton" else "")
        )
    return loaded
