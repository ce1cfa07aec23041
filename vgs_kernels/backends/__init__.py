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
# What ``auto`` tries on CUDA tensors, first available first. Triton before the CUDA kernel: both move the
# same bytes per row (memory-bound on H100 / H200 in the cost model), and compiled for sm_90 the Triton kernel
# issues fewer instructions per logit (pass A 50 vs 64, pass B 42 vs 86; 79 vs 80 registers, no spills:
# docs/kernels.md: how they were read from the compiled SASS). ``make gpu-check``'s row_kernels step
# measures both and says when a measurement disagrees with this order.
CUDA_ORDER = ("triton", "cuda", "torch")
CPU_ORDER = ("cpu", "torch")


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
    """Every backend name -> "available: <what it is, and whether auto picks it>" or "unavailable (<why>)"
    (e.g. the extension not built). ``is_available(status)`` tells the two apart."""
    out = {"reference": "available: materialised PyTorch with autograd (never picked by auto)"}
    auto = {dev: next((n for n in order if _usable(n, dev)), None) for dev, order in (("cuda", CUDA_ORDER),
                                                                                      ("cpu", CPU_ORDER))}
    for name in _LOADERS:
        loaded = _load(name)
        if isinstance(loaded, str):
            out[name] = f"unavailable ({loaded})"
        elif name == "cuda" and not torch.cuda.is_available():
            out[name] = "unavailable (no CUDA device)"
        else:
            picked = [dev for dev, n in auto.items() if n == name]
            out[name] = f"available: {_DESCRIBE[name]()}" + (
                f"; auto picks it for {' and '.join(picked).upper()} tensors" if picked else "")
    return out


def is_available(status: str) -> bool:
    """Whether a ``backends()`` status says available."""
    return status.startswith("available")


def _usable(name: str, device: str) -> bool:
    loaded = _load(name)
    return not isinstance(loaded, str) and device in loaded.devices and (device != "cuda" or torch.cuda.is_available())


def _cpu_kernel() -> str:
    from . import extension

    return f"C++ row kernel, {extension.CPU_ISA} variant"


_DESCRIBE = {
    "torch": lambda: "chunked PyTorch",
    "triton": lambda: "Triton row kernel" + ("" if "cuda" in _load("triton").devices else " (interpreter)"),
    "cpu": _cpu_kernel,
    "cuda": lambda: "CUDA row kernel",
}


def resolve(name: str | Backend, device: torch.device) -> Backend | None:
    """The backend to run on ``device`` for the name the caller gave (or the caller's own ``Backend``: a
    row function following the contract of ``torch_rows``); None means ``reference``.

    Raises ValueError for unknown names and for backends unavailable here or on that device.
    """
    if isinstance(name, Backend):
        if device.type not in name.devices:
            raise ValueError(f"backend {name.name!r} runs on {name.devices} tensors, got tensors on {device}")
        return name
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name == "reference":
        return None
    if name == "auto":
        order = CUDA_ORDER if device.type == "cuda" else CPU_ORDER
        for candidate in order:
            if _usable(candidate, device.type):
                return _load(candidate)
        raise ValueError(f"no backend runs on {device}; backends: {backends()}")
    loaded = _load(name)
    if isinstance(loaded, str):
        avail = [k for k, v in backends().items() if is_available(v)]
        raise ValueError(
            f"backend={name!r} is unavailable: {loaded}. Available backends: {avail}"
        )
    if device.type not in loaded.devices:
        raise ValueError(
            f"backend={name!r} runs on {loaded.devices} tensors, got tensors on {device}"
            + (" (set TRITON_INTERPRET=1 to run triton on CPU)" if name == "triton" else "")
        )
    return loaded
