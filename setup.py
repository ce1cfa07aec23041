"""Builds the optional extension vgs_kernels._C from csrc/ (C++/OpenMP, plus CUDA when available).

VGS_BUILD_EXT=0 skips it, VGS_BUILD_EXT=1 makes a failed build an error; unset, the build is tried
and a failure (no torch in the build environment, no compiler) leaves a pure-Python install whose
``vgs_kernels.backends()`` says why the compiled backends are missing.
"""

import glob
import os
import sys

from setuptools import setup

MODE = os.environ.get("VGS_BUILD_EXT", "")


def _extension_and_cmdclass():
    sources = sorted(glob.glob("csrc/*.cpp"))
    if MODE == "0" or not sources:
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        if MODE == "1":
            raise
        print("vgs-kernels: torch not importable at build time; skipping vgs_kernels._C "
              "(use pip install --no-build-isolation)", file=sys.stderr)
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    extra = {"cxx": ["-O3", "-fopenmp"]}
    kwargs = dict(name="vgs_kernels._C", extra_link_args=["-fopenmp"], extra_compile_args=extra)
    if use_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        ext = cpp_extension.CUDAExtension(sources=sources + cuda_sources, define_macros=[("VGS_WITH_CUDA", None)], **kwargs)
    else:
        ext = cpp_extension.CppExtension(sources=sources, **kwargs)

    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)

    class OptionalBuild(base):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if MODE == "1":
                    raise
                print(f"vgs-kernels: building vgs_kernels._C failed ({exc}); installing without it",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if MODE == "1":
                    raise
                print(f"vgs-kernels: building {ext.name} failed ({exc}); installing without it",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuild}


ext_modules, cmdclass = _extension_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
