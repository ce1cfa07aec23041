"""The compiled `cpu` backend (vgs_kernels._C, csrc/) against `reference` and the torch row kernel."""

import itertools
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from vgs_kernels import backends
from vgs_kernels.backends import is_available, resolve, torch_rows

ROOT = Path(__file__).resolve().parents[2]
CPU_STATUS = backends()["cpu"]
needs_ext = pytest.mark.skipif(
    not is_available(CPU_STATUS),
    reason=f"cpu backend {CPU_STATUS}; build it with `pip install --no-build-isolation -e .`",
)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: intra-op threads only add OpenMP spin-waits (10x slower on a busy 2-core box).
    test_op_parallel_rows_match_serial covers the multi-threaded path."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The reference grid (modes x reductions x temperatures x V x vocab_size x dtypes) runs every
# row backend, cpu included, in tests/kernels/test_loss_backends.py (detach_target_prior and fixed
# thresholds too).


@needs_ext
def test_auto_picks_cpu():
    assert resolve("auto", torch.device("cpu")).name == "cpu"


# ---- the operator itself, against the torch row kernel ----

def _op_inputs(n, V, dtype, seed, scale=3.0, extreme=False, strided=False):
    g = torch.Generator().manual_seed(seed)
    width = V + 5 if strided else V
    z = [(torch.randn(n, width, generator=g) * scale) for _ in range(4)]
    if extreme:  # masked vocabulary entries and huge logits
        z[0][0, : V // 3] = -float("inf")
        z[1][1, V // 2 :] = -float("inf")
        z[2][2, ::3] = -float("inf")
        z[3][3, 1::4] = -float("inf")
        for k in range(4):
            z[k][4, ::7] = 1e4
            z[k][5, ::5] = -1e4
        z[0][6, :] = -float("inf")  # a fully masked row: uniform distribution
    z = [x.to(dtype) for x in z]
    if strided:  # row stride V + 5, last dim contiguous
        z = [x[:, :V] for x in z]
    coef = torch.rand(n, 3, generator=g)
    coef[1, 1] = 0  # no vis term
    coef[2, 0] = 0  # no std term
    coef[3, :2] = 0  # no zs gradient at all
    coef[min(n - 1, 7)] = 0
    return z, coef


def _both(z, coef, tau, detach, acc, with_gs=True, with_gsp=True):
    out = []
    for fn in (torch_rows.vgs_rows, torch.ops.vgs_kernels.vgs_rows):
        n, V = z[0].shape
        gs = torch.full((n, V), 7.0, dtype=acc) if with_gs else None  # must be overwritten
        gsp = torch.full((n, V), 7.0, dtype=acc) if with_gsp else None
        if fn is torch_rows.vgs_rows:
            st = fn(*z, coef, temperature=tau, detach_target_prior=detach, grad_zs=gs, grad_zsp=gsp)
        else:
            st = fn(*z, coef, tau, detach, gs, gsp)
        out.append((st, gs, gsp))
    return out


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 33, 2500])
def test_op_matches_torch_rows(dtype, V):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]
    for tau, detach, strided in itertools.product((1.0, 0.7), (True, False), (False, True)):
        z, coef = _op_inputs(9, V, dtype, seed=V, strided=strided)
        (st_r, gs_r, gsp_r), (st, gs, gsp) = _both(z, coef, tau, detach, acc)
        what = f"{dtype} V={V} tau={tau} detach={detach} strided={strided}"
        assert st.dtype == torch.float32 and st.shape == (9, 4)
        assert_close(st, st_r, tol, tol, f"stats {what}")
        assert_close(gs, gs_r, tol, tol, f"grad_zs {what}")
        assert_close(gsp, gsp_r, tol, tol, f"grad_zsp {what}")


@needs_ext
def test_op_parallel_rows_match_serial():
    z, coef = _op_inputs(40, 3000, torch.bfloat16, seed=8)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        gs, gsp = torch.empty(40, 3000), torch.empty(40, 3000)
        st = torch.ops.vgs_kernels.vgs_rows(*z, coef, 0.7, False, gs, gsp)
        results.append((st, gs, gsp))
    torch.set_num_threads(1)
    for a, b in zip(*results):  # rows are independent: bitwise equal
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_inf_and_huge_logits(dtype):
    for tau, detach in itertools.product((1.0, 0.7), (True, False)):
        z, coef = _op_inputs(8, 300, dtype, seed=11, extreme=True)
        (st_r, gs_r, gsp_r), (st, gs, gsp) = _both(z, coef, tau, detach, torch.float32)
        for t in (st, gs, gsp):
            assert torch.isfinite(t).all()
        # rows with -inf in the teacher have KLs of order 1e30: compare relative to each row
        for row in range(8):
            assert_close(st[row], st_r[row], 1e-4, 1e-4, f"stats row {row}")
            assert_close(gs[row], gs_r[row], 1e-4, 1e-4, f"grad_zs row {row}")
            assert_close(gsp[row], gsp_r[row], 1e-4, 1e-4, f"grad_zsp row {row}")
        assert torch.all(gs[0, : 300 // 3] == 0)  # p = 0 on masked student entries


@needs_ext
def test_op_optional_grads_and_copy_back():
    z, coef = _op_inputs(5, 64, torch.float32, seed=2)
    (st_r, gs_r, _), (st, gs, gsp) = _both(z, coef, 0.7, True, torch.float32, with_gsp=False)
    assert gsp is None
    assert_close(gs, gs_r, 1e-5, 1e-5, "grad_zs")
    st2 = torch.ops.vgs_kernels.vgs_rows(*z, coef, 0.7, True, None, None)
    assert torch.equal(st2, st)
    # a bf16 / non-contiguous gradient buffer is written through a temporary and copied back
    buf = torch.zeros(64, 5, dtype=torch.bfloat16).t()
    torch.ops.vgs_kernels.vgs_rows(*z, coef, 0.7, True, buf, None)
    assert_close(buf, gs_r.to(torch.bfloat16), 1e-2, 1e-2, "bf16 grad_zs")
    with pytest.raises(RuntimeError, match="coef"):
        torch.ops.vgs_kernels.vgs_rows(*z, coef[:, :2], 0.7, True, None, None)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.vgs_kernels.vgs_rows(z[0], z[1][:, :10], z[2], z[3], coef, 0.7, True, None, None)


@needs_ext
def test_op_fake_tensors_and_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    z, coef = _op_inputs(6, 50, torch.bfloat16, seed=4)
    with FakeTensorMode() as mode:
        fz = [mode.from_tensor(x) for x in z]
        fc = mode.from_tensor(coef)
        out = torch.ops.vgs_kernels.vgs_rows(*fz, fc, 0.7, False, torch.empty(6, 50), None)
        assert out.shape == (6, 4) and out.dtype == torch.float32

    def f(zs, zsp, zt, ztp, c):
        g = torch.empty(zs.shape, dtype=torch.float32)
        st = torch.ops.vgs_kernels.vgs_rows(zs, zsp, zt, ztp, c, 0.7, False, g, None)
        return st.sum(1), g * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a, b = compiled(*z, coef)
    a_ref, b_ref = f(*z, coef)
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)


@needs_ext
def test_op_opcheck():
    z, coef = _op_inputs(4, 40, torch.float32, seed=6)
    args = (*z, coef, 0.7, False, torch.empty(4, 40), torch.empty(4, 40))
    torch.library.opcheck(torch.ops.vgs_kernels.vgs_rows.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---- the build is optional ----

def _setup_kwargs(monkeypatch, mode):
    """Run setup.py with setuptools.setup replaced; return what it would have been called with."""
    import setuptools

    if mode is None:
        monkeypatch.delenv("VGS_BUILD_EXT", raising=False)
    else:
        monkeypatch.setenv("VGS_BUILD_EXT", mode)
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    ns = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    return captured, ns


def test_setup_honours_vgs_build_ext(monkeypatch, capsys):
    kw, _ = _setup_kwargs(monkeypatch, "0")
    assert kw["ext_modules"] == [] and "build_ext" not in kw["cmdclass"]  # build_py records the skip

    kw, _ = _setup_kwargs(monkeypatch, None)
    (ext,) = kw["ext_modules"]
    assert ext.name == "vgs_kernels._C"
    assert any(s.endswith("vgs_rows_cpu.cpp") for s in ext.sources)

    # a failing compiler: tolerated when VGS_BUILD_EXT is unset, an error with VGS_BUILD_EXT=1
    from setuptools.dist import Distribution
    from torch.utils import cpp_extension

    def boom(self, ext):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extension", boom)
    cmd = kw["cmdclass"]["build_ext"](Distribution())
    cmd.build_extension(ext)
    assert "installing without it" in capsys.readouterr().err
    kw, _ = _setup_kwargs(monkeypatch, "1")
    cmd = kw["cmdclass"]["build_ext"](Distribution())
    with pytest.raises(RuntimeError, match="simulated"):
        cmd.build_extension(kw["ext_modules"][0])


def test_missing_extension_is_reported_not_fatal():
    code = (
        "import sys; sys.modules['vgs_kernels._C'] = None\n"
        "import torch, vgs_kernels\n"
        "from vgs_kernels.backends import resolve\n"
        "print(vgs_kernels.backends()['cpu'])\n"
        "print(resolve('auto', torch.device('cpu')).name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    status, auto = out.stdout.strip().splitlines()
    assert status.startswith("unavailable") and "vgs_kernels._C is not installed" in status
    assert auto == "torch"
