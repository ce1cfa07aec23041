"""The CPU a run computes on, and the instruction-set settings that emulate another one.

ATen's vectorised kernels, MKL and oneDNN pick AVX-512 or AVX2 code paths by CPU at run time, and the two
give different floating-point results for the same operation. A claim about training outcomes must hold on
both, so the study runs its arms under the machine's default and under ``ISA_SETTINGS["avx2"]`` (read by
the libraries when they load: set in the environment of a new process, never in a running one).
"""

from __future__ import annotations

import os
import platform

ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
ISA_SETTINGS = {
    "default": {},  # what the machine has
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name


def describe() -> dict:
    """{"cpu", "cores", "cpu_capability" (the ATen code path in use: AVX512, AVX2, ...), "isa_env" (the
    emulation variables set in this process)}."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}


def isa_environment(setting: str) -> dict:
    """os.environ for a new process under ``setting`` (a key of ``ISA_SETTINGS``): the emulation variables
    of the other settings removed."""
    if setting not in ISA_SETTINGS:
        raise ValueError(f"unknown instruction-set setting {setting!r}; valid: {sorted(ISA_SETTINGS)}")
    env = {k: v for k, v in os.environ.items() if k not in ISA_ENV}
    env.update(ISA_SETTINGS[setting])
    return env
