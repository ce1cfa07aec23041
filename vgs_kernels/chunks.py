"""How many token rows a chunk holds: as many as the memory budget allows, never the whole batch."""

from __future__ import annotations

import math

import torch

from . import hooks
from .gemm import on_gpu

# Chunk budgets: the bytes a chunk's logit buffers (and the row kernel's own temporaries) may take.
# CUDA: a quarter of the free memory, at most CUDA_CHUNK_BUDGET (2048 rows at V = 151936 in bf16
# with four streams; docs/kernels.md compares the peak with Liger's); CPU: a fixed size
# (larger chunks buy nothing there).
CUDA_CHUNK_BUDGET = 5 * 2**29  # 2.5 GiB
CPU_CHUNK_BUDGET = 192 * 2**20
CHUNK_ROW_MULTIPLE = 128  # GEMM-friendly row counts once chunks are at least 2x this


def free_device_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device (``hooks.simulate_gpu``'s inside it)."""
    simulated = hooks.simulated_free_bytes()
    if simulated is not None:
        return simulated
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, temps: int = 0, *,
                       dtype: torch.dtype = torch.float32, streams: float = 4, largest: float = 1.0) -> int:
    """Rows per chunk for ``n_rows`` rows of ``vocab`` logits.

    A chunk row costs ``streams`` logit (or gradient) rows in ``dtype`` plus ``temps`` fp32 rows
    the row kernel allocates itself (the torch kernel's temporaries; 0 for the streaming kernels);
    as many rows as fit the budget (a quarter of free memory up to ``CUDA_CHUNK_BUDGET`` on CUDA,
    rounded down to a multiple of ``CHUNK_ROW_MULTIPLE``; ``CPU_CHUNK_BUDGET`` on CPU), and so few
    that the largest buffer (``largest`` logit rows per chunk row) holds at most half the rows: the
    fused path never holds the logits of the whole batch."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = max(1, math.ceil(vocab * (streams * itemsize + 4 * temps)))
    if on_gpu(device):
        budget = min(free_device_memory(device) // 4, CUDA_CHUNK_BUDGET)
    else:
        budget = CPU_CHUNK_BUDGET
    rows = max(1, budget // row_bytes)
    if on_gpu(device) and rows >= 2 * CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return max(1, min(rows, math.floor(math.ceil(n_rows / 2) / largest)))
