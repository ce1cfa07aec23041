"""Builds the optional extension vgs_kernels._C from csrc/ (C++/OpenMP, plus CUDA when available).

VGS_BUILD_EXT=0 skips it, VGS_BUILD_EXT=1 makes a failed build an error; unset, the build is tried
and a failure (no torch in the build environment, no compiler, a compile error) leaves a pure-Python
install. Either way the outcome is written to ``vgs_kernels/_C_build.txt`` inside the installed
package, and ``vgs_kernels.backends()`` quotes it when the compiled backends are missing.
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

MODE = os.environ.get("VGS_BUILD_EXT", "")
STATUS = os.path.join("vgs_kernels", "_C_build.txt")
HERE = os.path.dirname(os.path.abspath(__file__))


def _write_status(cmd, text: str, in_source: bool) -> None:
    """The build outcome, into the package being built (and the source tree for in-place builds)."""
    targets = [os.path.join(cmd.build_lib, STATUS)] if getattr(cmd, "build_lib", None) else []
    if in_source:
        targets.append(os.path.join(HERE, STATUS))
    for path in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text.rstrip() + "\n")


def _skip_reason() -> str | None:
    if MODE == "0":
        return "skipped: VGS_BUILD_EXT=0"
    if not glob.glob(os.path.join(HERE, "csrc", "*.cpp")):
        return "skipped: csrc/*.cpp missing from this source tree"
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError as exc:
        return (f"skipped: torch was not importable in the build environment ({exc}); "
                "install torch first and use pip install --no-build-isolation")
    return None


def _set_cuda_home() -> None:
    """CUDA_HOME from the real toolkit behind the nvcc on PATH when unset (vgs_kernels/_cuda_home.py: torch
    would guess it from a wrapper script's folder)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cuda_home", os.path.join(HERE, "vgs_kernels", "_cuda_home.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    home = mod.cuda_home_from_nvcc()
    if home:
        os.environ["CUDA_HOME"] = home


SKIP = _skip_reason()
if not SKIP:
    _set_cuda_home()


class BuildPyWithStatus(build_py):
    """Writes the skip reason when there is no extension to build (build_ext overwrites it)."""

    def run(self):
        super().run()
        if SKIP:
            _write_status(self, SKIP, in_source=bool(getattr(self, "editable_mode", False)))


def _extension_and_cmdclass():
    if SKIP:
        if MODE == "1":
            raise RuntimeError(f"VGS_BUILD_EXT=1 but vgs_kernels._C cannot be built: {SKIP}")
        print(f"vgs-kernels: {SKIP}; installing without vgs_kernels._C", file=sys.stderr)
        return [], {"build_py": BuildPyWithStatus}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    extra = {"cxx": ["-O3", "-fopenmp"]}
    kwargs = dict(name="vgs_kernels._C", extra_link_args=["-fopenmp"], extra_compile_args=extra,
                  depends=sorted(glob.glob("csrc/*.h")))
    if use_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        ext = cpp_extension.CUDAExtension(sources=sources + cuda_sources, define_macros=[("VGS_WITH_CUDA", None)], **kwargs)
    else:
        ext = cpp_extension.CppExtension(sources=sources, **kwargs)
    what = f"CPU + CUDA, CUDA_HOME={cpp_extension.CUDA_HOME}" if use_cuda else "CPU only" + (
        "" if not cuda_sources else f" (no CUDA: torch.version.cuda={torch.version.cuda}, "
                                    f"CUDA_HOME={cpp_extension.CUDA_HOME})")

    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)

    class OptionalBuild(base):
        def _record(self, text):
            _write_status(self, text, in_source=bool(self.inplace))

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                self._failed(exc)
            else:
                if not getattr(self, "_vgs_failed", False):
                    self._record(f"built: vgs_kernels._C ({what}) against torch {torch.__version__}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)

        def _failed(self, exc):
            if MODE == "1":
                raise exc
            self._vgs_failed = True
            detail = f"{type(exc).__name__}: {exc}".strip()
            self._record(f"failed: building vgs_kernels._C ({what}) against torch {torch.__version__}: {detail[-2000:]}")
            print(f"vgs-kernels: building vgs_kernels._C failed ({detail[-500:]}); installing without it",
                  file=sys.stderr)

    return [ext], {"build_ext": OptionalBuild, "build_py": build_py}


ext_modules, cmdclass = _extension_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
