"""Seeded work that leaves the run's random streams untouched."""

from __future__ import annotations

import torch


def fork_rng():
    """``torch.random.fork_rng`` over the CPU and every CUDA generator: a ``torch.manual_seed`` inside
    reseeds all of them, so forking the CPU one only would reset the training run's CUDA stream."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)
