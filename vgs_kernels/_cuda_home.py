"""The CUDA toolkit behind the ``nvcc`` on PATH, for building ``vgs_kernels._C`` (setup.py loads this file
by path, before torch's ``cpp_extension`` guesses one).

torch guesses ``CUDA_HOME`` from the folder of the ``nvcc`` it finds on PATH; when that ``nvcc`` is a wrapper
script outside the toolkit (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``), the guess is
``/usr/local`` and the host code cannot find ``cuda_runtime.h``. ``nvcc -dryrun`` prints the real toolkit's
root (``#$ TOP=...``), whatever the wrapper.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess


def cuda_home_from_nvcc(nvcc: str | None = None) -> str | None:
    """The toolkit root (a folder with ``include/cuda_runtime.h``) of ``nvcc`` (default: the one on PATH),
    following wrappers and symlinks; None when there is no nvcc or no such folder."""
    nvcc = nvcc or shutil.which("nvcc")
    if not nvcc:
        return None
    candidates = []
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            candidates.append(os.path.realpath(m.group(1).strip()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None
