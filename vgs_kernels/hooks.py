"""Observers of what the loss runs: the events the driver reports, for checks and cost models.

    from vgs_kernels import hooks

    with hooks.observe(lambda event, info: print(event, info)):
        fused_linear_vgs_loss(...)

Events (``info`` is a dict; shapes are tuples):

* ``"chunk"``: a pass starts a chunk of rows: ``pass_`` (1 or 2), ``rows``, ``chunk_size`` (the most rows
  per chunk);
* ``"rows"``: a row-kernel call: ``kernel`` (the row function's dotted name, or the extension's operator), ``rows``, ``width``, ``vocab``, ``dtype``,
  ``streams`` (4, or 2 when the text-only pair is the image pair), ``grads`` (the gradient buffers
  written: 0, 1 or 2);
* ``"accumulate"``: a weight-gradient GEMM into the fp32 accumulator: ``path`` (``"addmm"`` operands
  of the accumulator's dtype; ``"addmm_fp32_out"`` bf16 / fp16 operands, fp32 accumulation in place, one
  GEMM; ``"slabs"`` the same through fp32 products of ``ACCUMULATE_SLAB_ROWS`` rows, what torch < 2.10
  does on CUDA; ``"upcast"`` operands upcast to fp32 first, the CPU's way), ``shape`` (the accumulator's),
  ``k`` (the rows summed over).

Observers run synchronously inside the loss and must not change its tensors. Nothing is recorded
unless an observer is installed.

``simulate_gpu(free_bytes)`` makes the driver take its CUDA paths (fp32-output tensor-core GEMMs, the
in-place fp32 accumulation, the chunk budget of a device with ``free_bytes`` free) whatever the tensors'
device: for cost models that trace the loss on fake CPU tensors, never for real
computation. A row function of your own (``vgs_kernels.backends.Backend``) can be passed as ``backend=``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

Observer = Callable[[str, dict], None]
_observers: list[Observer] = []


@contextlib.contextmanager
def observe(callback: Observer):
    """Call ``callback(event, info)`` for every event the loss reports inside the ``with`` block."""
    _observers.append(callback)
    try:
        yield callback
    finally:
        _observers.remove(callback)


_simulated_free_bytes: int | None = None


@contextlib.contextmanager
def simulate_gpu(free_bytes: int):
    """Inside the block the driver treats every tensor as a CUDA tensor on a device with ``free_bytes``
    free (cost models on fake tensors only: the CUDA-only GEMM overloads do not run on real CPU tensors)."""
    global _simulated_free_bytes
    old, _simulated_free_bytes = _simulated_free_bytes, int(free_bytes)
    try:
        yield
    finally:
        _simulated_free_bytes = old


def simulated_free_bytes() -> int | None:
    """The free bytes of ``simulate_gpu`` while it is active, else None."""
    return _simulated_free_bytes


def active() -> bool:
    return bool(_observers)


def emit(event: str, **info) -> None:
    for cb in list(_observers):
        cb(event, info)


class Recorder:
    """An observer that keeps every event: ``with hooks.observe(rec := Recorder()): ...``; then
    ``rec.events`` [(event, info)] and ``rec.of("accumulate")`` [info]."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def __call__(self, event: str, info: dict) -> None:
        self.events.append((event, info))

    def of(self, event: str) -> list[dict]:
        return [info for e, info in self.events if e == event]
