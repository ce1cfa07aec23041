"""The CUDA build compiles on a machine without a GPU: csrc/*.cu for sm_80 and sm_90 with no error, no
warning and no register spill, and the CUDA host code (csrc/*_cuda_host.cpp, with VGS_WITH_CUDA) with no
error or warning -- nvcc against the headers of the installed torch (a CPU wheel ships the ATen/cuda and
c10/cuda headers; only the generated c10/cuda/impl/cuda_cmake_macros.h is missing, and a one-line
stand-in replaces it), with the flags torch's BuildExtension uses. Skipped without nvcc."""

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
HOST_SOURCES = sorted((ROOT / "csrc").glob("*_cuda_host.cpp"))
NVCC = shutil.which("nvcc")
ARCHS = ("80", "90")


def _std_flag() -> str:
    # the C++ standard torch's headers (and BuildExtension) use: C++20 from torch 2.10 on
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


def _common(stand_in: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()  # torch's headers (nvcc adds the CUDA toolkit's)
    return [_std_flag(), "-Xcompiler", "-fPIC", "-DVGS_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{stand_in}", *(f"-I{p}" for p in includes),
            f"-I{sysconfig.get_paths()['include']}"]


def _device_command(src: Path, obj: Path, stand_in: Path) -> list[str]:
    from torch.utils import cpp_extension

    cmd = [NVCC, "-c", str(src), "-o", str(obj), "-O3", "--use_fast_math", *cpp_extension.COMMON_NVCC_FLAGS,
           "-Xptxas", "-v", "--threads", "2", *_common(stand_in)]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd


def _stand_in(tmp_path: Path) -> Path:
    stand_in = tmp_path / "include"
    macros = stand_in / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return stand_in


def _warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\bwarning\b", line, re.IGNORECASE)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every compile of this module started at once (they are independent; on two cores this halves
    the wall time), then waited for: {source name: (return code, log)}."""
    tmp = tmp_path_factory.mktemp("nvcc")
    stand_in = _stand_in(tmp)
    cmds = {src.name: _device_command(src, tmp / f"{src.stem}.o", stand_in) for src in SOURCES}
    for src in HOST_SOURCES:  # as C++ by the host compiler, through nvcc so the CUDA headers are found
        cmds[src.name] = [NVCC, "-x", "c++", "-c", str(src), "-o", str(tmp / f"{src.stem}.o"), "-O0",
                          *_common(stand_in)]
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in cmds.items()}
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        out[name] = (proc.returncode, log)
    return out


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources are not compiled here")
@pytest.mark.skipif(not SOURCES, reason="no csrc/*.cu")
@pytest.mark.parametrize("src", SOURCES, ids=[s.name for s in SOURCES])
def test_cuda_sources_compile_without_warnings(src, compiled):
    returncode, log = compiled[src.name]
    assert returncode == 0, log[-6000:]
    warnings = _warnings(log)
    assert not warnings, "\n".join(warnings[:20])
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    kernels = len(re.findall(r"Compiling entry function", log))
    assert kernels >= len(ARCHS), log[-3000:]
    assert spills and not any(spills), f"register spills (bytes per kernel): {spills}"
    sys.stdout.write(f"{src.name}: {kernels} kernels compiled for sm_{', sm_'.join(ARCHS)}, no spills\n")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA host code is not compiled here")
@pytest.mark.parametrize("src", HOST_SOURCES, ids=[s.name for s in HOST_SOURCES])
def test_cuda_host_code_compiles_without_warnings(src, compiled):
    returncode, log = compiled[src.name]
    assert returncode == 0, log[-6000:]
    assert not _warnings(log), "\n".join(_warnings(log)[:20])
