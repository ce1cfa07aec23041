"""pip install from a source distribution, as a PyPI user would: the sdist carries every source the
extension build needs, and a wheel built from it (in a directory holding nothing but the unpacked
sdist) contains vgs_kernels._C, which imports from a fresh install location.

To stay fast it reuses this environment's torch and setuptools (``pip wheel --no-build-isolation``;
an isolated build would download torch) and installs the wheel with ``--target`` into an empty
directory instead of creating a virtual environment. The build-failure message is checked without
a build."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _run(cmd, cwd, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _sdist(out: Path) -> Path:
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=ROOT)
    (path,) = out.glob("vgs_kernels-*.tar.gz")
    return path


def test_sdist_ships_every_build_source(tmp_path):
    with tarfile.open(_sdist(tmp_path)) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if len(Path(n).parts) > 1}
    needed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.is_file()}
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "vgs_train" / "prepared").rglob("*") if p.is_file()}
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"


@pytest.mark.slow
@pytest.mark.skipif(CXX is None, reason="no C++ compiler: the extension cannot be built here")
def test_wheel_built_from_the_sdist_has_the_extension(tmp_path):
    sdist = _sdist(tmp_path / "sdist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGS_BUILD_EXT")}
    env["VGS_BUILD_EXT"] = "1"  # a failed build is an error here, not a silent pure-Python wheel
    env["MAX_JOBS"] = "2"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(sdist),
          "-w", str(tmp_path / "wheel")], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "wheel").glob("vgs_kernels-*.whl")
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
          str(wheel)], cwd=tmp_path)
    assert list((site / "vgs_kernels").glob("_C*.so")), "the wheel has no vgs_kernels._C"
    shipped = {p.relative_to(ROOT / "vgs_train").as_posix() for p in (ROOT / "vgs_train" / "prepared").rglob("*")
               if p.is_file()}
    installed = {p.relative_to(site / "vgs_train").as_posix() for p in (site / "vgs_train" / "prepared").rglob("*")
                 if p.is_file()}
    assert shipped and shipped <= installed, f"the wheel lacks the prepared models: {sorted(shipped - installed)}"
    probe = ("import vgs_kernels, vgs_kernels._C, pathlib; "
             "print(pathlib.Path(vgs_kernels.__file__).resolve().parent); print(vgs_kernels.backends()['cpu']); "
             "print((pathlib.Path(vgs_kernels.__file__).parent / '_C_build.txt').read_text().strip())")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = _run([sys.executable, "-c", probe], cwd=tmp_path, env=env, timeout=300).stdout.splitlines()
    assert out[0] == str((site / "vgs_kernels").resolve()), out  # the fresh install, not this checkout
    assert out[1].startswith("available"), out
    assert out[2].startswith("built: vgs_kernels._C"), out


def test_missing_extension_message_says_what_failed(monkeypatch, tmp_path):
    from vgs_kernels.backends import extension

    record = tmp_path / "_C_build.txt"
    monkeypatch.setattr(extension, "BUILD_RECORD", record)
    record.write_text("failed: building vgs_kernels._C (CPU only) against torch 2.13: CompileError: "
                      "csrc/vgs_common.h: No such file or directory\n")
    msg = extension._not_available(ModuleNotFoundError("No module named 'vgs_kernels._C'"))
    assert "was not built" in msg and "vgs_common.h: No such file or directory" in msg
    record.write_text("skipped: VGS_BUILD_EXT=0\n")
    assert "VGS_BUILD_EXT=0" in extension._not_available(ModuleNotFoundError("x"))
    record.unlink()
    msg = extension._not_available(ModuleNotFoundError("No module named 'vgs_kernels._C'"))
    assert "no build was attempted" in msg and "compiler" not in msg
    msg = extension._not_available(ImportError("undefined symbol: _ZN3c10"))
    assert "another torch" in msg and "undefined symbol" in msg
