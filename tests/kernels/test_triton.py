"""The Triton backend against the reference, on CPU tensors in the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton (and the kernel module) is imported: ``triton.jit``
decides at decoration time whether a kernel is interpreted. Shapes stay tiny: the interpreter runs
every program in Python.

On a GPU machine, ``VGS_TRITON_TEST_DEVICE=cuda pytest tests/kernels/test_triton.py`` runs the same tests
with the compiled kernels on CUDA tensors (inputs are made on the CPU and moved).
"""

from __future__ import annotations

import importlib
import os
import sys

DEVICE = os.environ.get("VGS_TRITON_TEST_DEVICE", "cpu")
INTERPRET = DEVICE == "cpu"

import pytest  # noqa: E402
import torch  # noqa: E402

from vgs_kernels import fused_linear_vgs_loss, vgs_loss  # noqa: E402
from vgs_kernels.backends import torch_rows  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not importable: the triton backend is not tested")
if INTERPRET and os.environ.get("TRITON_INTERPRET") != "1":
    # tests/conftest.py sets it before triton is first used; triton reads it only once per process
    pytest.skip("TRITON_INTERPRET=1 must be set before triton is used", allow_module_level=True)
if not INTERPRET and not (DEVICE.startswith("cuda") and torch.cuda.is_available()):
    pytest.skip(f"VGS_TRITON_TEST_DEVICE={DEVICE!r} but no CUDA device", allow_module_level=True)

from vgs_kernels.backends import triton_rows  # noqa: E402

backends = importlib.import_module("vgs_kernels.backends")  # (vgs_kernels.backends is also a function)


MODES = ("standard", "vgs", "adaptive", "language")
STATS = ("std", "vis", "lang", "vds")


def _close(actual, expected, rtol, what=""):
    """Max-norm closeness: |a - e| <= rtol * max(|e|.max(), 1e-3) (elementwise rtol is meaningless
    for gradient entries that are ~0)."""
    if expected is None:  # autograd's "no gradient" (e.g. the text stream in mode="standard")
        expected = torch.zeros_like(actual)
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-3)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol:g} * {scale:.3g}"


def _logits(B, T, V, dtype, seed, scale=2.0, extra=3):
    """Four [B, T, V] logit tensors as views of wider [B, T, V + extra] tensors (row stride > V);
    the teacher rows are correlated with the student's so that the KLs are of moderate size."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, V + extra, generator=g) * scale
    out = []
    for _ in range(4):
        z = base + torch.randn(B, T, V + extra, generator=g) * scale
        out.append(z.to(dtype)[..., :V])
    return out


def _to(x):
    return None if x is None else x.to(DEVICE)


def _mask(B, T):
    m = torch.ones(B, T, dtype=torch.bool)
    m[1] = False  # an empty sequence
    if T > 2:
        m[0, -1] = False
    return m


def _run_logits(backend, zs, zsp, zt, ztp, mask=None, **kw):
    a = _to(zs.detach()).clone().requires_grad_(True)
    b = _to(zsp.detach()).clone().requires_grad_(True)
    out = vgs_loss(a, b, _to(zt), _to(ztp), _to(mask), backend=backend, return_per_token=True, **kw)
    out.loss.backward()
    return out, a.grad, b.grad


def _compare_outputs(o1, o2, rtol):
    _close(o1.loss.detach(), o2.loss.detach(), rtol, "loss")
    for k in STATS:
        _close(o1.per_token[k], o2.per_token[k], rtol, k)
    assert torch.equal(o1.per_token["gate"].cpu(), o2.per_token["gate"].cpu())


# ------------------------------------------------------------------ row function vs torch_rows


def _rows(fn, z, coef, det, tau, grads=(True, True)):
    """Row function on DEVICE (the same tensor objects stay aliased); results back on the CPU."""
    n, V = z[0].shape
    moved = {}
    z = [moved.setdefault(id(x), _to(x)) for x in z]
    gs = torch.full((n, V), float("nan"), device=DEVICE) if grads[0] else None
    gsp = torch.full((n, V), float("nan"), device=DEVICE) if grads[1] else None
    stats = fn(*z, _to(coef), temperature=tau, detach_target_prior=det, grad_zs=gs, grad_zsp=gsp)
    return tuple(None if x is None else x.cpu() for x in (stats, gs, gsp))


@pytest.mark.parametrize("V", [1, 97, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_match_torch_rows(V, dtype):
    n = 4
    z = [x.reshape(-1, V) for x in _logits(1, n, V, dtype, seed=V)]
    coef = torch.rand(n, 3, generator=torch.Generator().manual_seed(1))
    for det, tau in ((True, 1.0), (False, 0.7)):
        got = _rows(triton_rows.vgs_rows, z, coef, det, tau)
        want = _rows(torch_rows.vgs_rows, z, coef, det, tau)
        for g, w, name in zip(got, want, ("stats", "grad_zs", "grad_zsp")):
            _close(g, w, 1e-5, f"{name} V={V} {dtype} det={det}")


def test_rows_grad_subsets_and_aliased_streams():
    """Only one gradient requested; and the gated-pass call (zsp, zsp, ztp, ztp) of mode='vgs'."""
    n, V = 3, 200
    z = [x.reshape(-1, V) for x in _logits(1, n, V, torch.float32, seed=5)]
    coef = torch.rand(n, 3)
    for grads in ((True, False), (False, True), (False, False)):
        got = _rows(triton_rows.vgs_rows, z, coef, False, 0.7, grads)
        want = _rows(torch_rows.vgs_rows, z, coef, False, 0.7, grads)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                _close(g, w, 1e-5, f"grads={grads}")
    # gradient buffers in half precision (written directly) or strided (through an fp32 buffer)
    ref = _rows(torch_rows.vgs_rows, z, coef, False, 0.7)
    gs = torch.empty(n, V, dtype=torch.bfloat16, device=DEVICE)
    gsp = torch.full((n, 2 * V), float("nan"), device=DEVICE)[:, ::2]
    triton_rows.vgs_rows(*[_to(x) for x in z], _to(coef), temperature=0.7, detach_target_prior=False,
                         grad_zs=gs, grad_zsp=gsp)
    _close(gs, ref[1], 1e-2, "bf16 grad buffer")
    _close(gsp, ref[2], 1e-5, "strided grad buffer")
    zsp, ztp = z[1], z[3]
    c = coef * torch.tensor([1.0, 0.0, 0.0])
    got = _rows(triton_rows.vgs_rows, [zsp, zsp, ztp, ztp], c, True, 1.0, (True, False))
    want = _rows(torch_rows.vgs_rows, [zsp, zsp, ztp, ztp], c, True, 1.0, (True, False))
    _close(got[0], want[0], 1e-5, "aliased stats")
    _close(got[1], want[1], 1e-5, "aliased grad")


def test_rows_masked_vocab_and_large_logits():
    """-inf entries (shared by all streams, or student-only) give probability 0 and no NaN;
    +-1e4 logits stay finite and match."""
    n, V = 4, 150
    g = torch.Generator().manual_seed(3)
    z = [x.reshape(-1, V).clone() for x in _logits(1, n, V, torch.float32, seed=3)]
    shared = torch.rand(n, V, generator=g) < 0.4
    shared[1, 1:] = True  # a row with a single allowed id
    student_only = (torch.rand(n, V, generator=g) < 0.2) & ~shared
    student_only[1] = False
    for k in range(4):
        z[k][shared] = float("-inf")
    for k in (0, 1):
        z[k][student_only] = float("-inf")
    coef = torch.rand(n, 3, generator=g)
    for det in (True, False):
        got = _rows(triton_rows.vgs_rows, z, coef, det, 0.7)
        want = _rows(torch_rows.vgs_rows, z, coef, det, 0.7)
        for a, b, name in zip(got, want, ("stats", "grad_zs", "grad_zsp")):
            _close(a, b, 1e-5, f"-inf {name}")
        assert (got[1][shared] == 0).all() and (got[2][shared] == 0).all()
        assert got[0][1].abs().max() < 1e-6  # one allowed id: every distribution is the same

    big = [x.reshape(-1, V) for x in _logits(1, n, V, torch.float32, seed=4, scale=1e4)]
    big[2] = big[0] + torch.randn(n, V, generator=g)  # teacher near the student: small std
    big[0][0, :10] = 1e4
    big[1][0, :10] = -1e4
    got = _rows(triton_rows.vgs_rows, big, coef, False, 1.0)
    want = _rows(torch_rows.vgs_rows, big, coef, False, 1.0)
    exact = _rows(torch_rows.vgs_rows, [x.double() for x in big], coef.double(), False, 1.0)
    for a, b, c, name in zip(got, want, exact, ("stats", "grad_zs", "grad_zsp")):
        assert torch.isfinite(a).all(), name
        # fp32 on logits of size 1e4: the absolute error of any fp32 method is ~1e4 * 2^-24 per term
        _close(a, c, 1e-6 if name == "stats" else 1e-5, f"1e4 {name} vs fp64")
        _close(a, b, 1e-6 if name == "stats" else 1e-5, f"1e4 {name} vs torch")


def test_rows_nan_propagates_and_fp64_falls_back():
    n, V = 2, 40
    z = [x.reshape(-1, V).clone() for x in _logits(1, n, V, torch.float32, seed=7)]
    z[2][0, 5] = float("nan")
    stats = _rows(triton_rows.vgs_rows, z, torch.ones(n, 3), True, 1.0, (False, False))[0]
    assert torch.isnan(stats[0]).any() and torch.isfinite(stats[1]).all()
    z64 = [x.reshape(-1, V) for x in _logits(1, n, V, torch.float64, seed=8)]
    got = _rows(triton_rows.vgs_rows, z64, torch.ones(n, 3), True, 1.0)
    want = _rows(torch_rows.vgs_rows, z64, torch.ones(n, 3), True, 1.0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ public API vs reference


def test_auto_and_explicit_backend_resolve_to_triton():
    be = backends.resolve("triton", torch.device(DEVICE))
    assert be.name == "triton" and be.rows_fn is triton_rows.vgs_rows


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vgs_loss_matches_reference_fp32(mode, reduction, temperature):
    z = _logits(3, 4, 300, torch.float32, seed=11)
    kw = dict(mode=mode, reduction=reduction, temperature=temperature, vocab_size=270,
              mask=_mask(3, 4), gamma=0.5)
    o1, g1s, g1sp = _run_logits("triton", *z, **kw)
    o2, g2s, g2sp = _run_logits("reference", *z, **kw)
    _compare_outputs(o1, o2, 1e-5)
    _close(g1s, g2s, 1e-5, "grad student")
    _close(g1sp, g2sp, 1e-5, "grad student_text")
    assert (g1s[..., 270:] == 0).all() and (g1s[1] == 0).all()  # outside vocab_size; empty sequence
    assert o1.per_token["gate"].sum() > 0  # the gated pass ran


@pytest.mark.parametrize("V", [1, 97])
@pytest.mark.parametrize("detach", [True, False])
def test_vgs_loss_small_vocab_and_prior_gradient(V, detach):
    z = _logits(2, 3, V, torch.float32, seed=V + 1)
    kw = dict(mode="vgs", temperature=0.7, mask=_mask(2, 3), detach_target_prior=detach, threshold=None)
    o1, g1s, g1sp = _run_logits("triton", *z, **kw)
    o2, g2s, g2sp = _run_logits("reference", *z, **kw)
    _compare_outputs(o1, o2, 1e-5)
    _close(g1s, g2s, 1e-5, "grad student")
    _close(g1sp, g2sp, 1e-5, "grad student_text")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vgs_loss_half_precision(dtype):
    z = _logits(2, 3, 97, dtype, seed=21)
    kw = dict(mode="adaptive", temperature=0.7, mask=_mask(2, 3))
    o1, g1s, g1sp = _run_logits("triton", *z, **kw)
    o2, g2s, g2sp = _run_logits("reference", *z, **kw)
    assert g1s.dtype == dtype and g1sp.dtype == dtype
    _compare_outputs(o1, o2, 1e-4)  # fp32 math on the same rounded inputs
    _close(g1s, g2s, 1e-2, "grad student")  # gradients are rounded to the input dtype
    _close(g1sp, g2sp, 1e-2, "grad student_text")


def test_vgs_loss_all_false_mask():
    z = _logits(2, 2, 50, torch.float32, seed=31)
    o, gs, gsp = _run_logits("triton", *z, mask=torch.zeros(2, 2, dtype=torch.bool))
    assert o.loss.item() == 0.0
    assert (gs == 0).all() and (gsp == 0).all()


def _hidden(B, T, Hs, Ht, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Hs, generator=g)
    hsp = hs + 0.5 * torch.randn(B, T, Hs, generator=g)
    ht = torch.randn(B, T, Ht, generator=g)
    htp = ht + 0.5 * torch.randn(B, T, Ht, generator=g)
    ws = torch.randn(V, Hs, generator=g) / Hs**0.5
    wt = torch.randn(V + 5, Ht, generator=g) / Ht**0.5
    bs = 0.1 * torch.randn(V, generator=g)
    bt = 0.1 * torch.randn(V + 5, generator=g)
    return [x.to(dtype) for x in (hs, hsp, ws, bs, ht, htp, wt, bt)]


def _run_linear(backend, hs, hsp, ws, bs, ht, htp, wt, bt, mask=None, **kw):
    leaves = [_to(x.detach()).clone().requires_grad_(True) for x in (hs, hsp, ws, bs)]
    out = fused_linear_vgs_loss(leaves[0], leaves[1], leaves[2], _to(ht), _to(htp), _to(wt), _to(mask),
                                student_bias=leaves[3], teacher_bias=_to(bt), backend=backend,
                                return_per_token=True, **kw)
    out.loss.backward()
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_fused_linear_matches_reference_fp32(mode, reduction):
    V = 130
    args = _hidden(3, 4, 16, 24, V, torch.float32, seed=41)
    kw = dict(mode=mode, reduction=reduction, temperature=0.7, vocab_size=120, mask=_mask(3, 4),
              detach_target_prior=mode != "vgs")
    o1, g1 = _run_linear("triton", *args, chunk_size=3, **kw)
    o2, g2 = _run_linear("reference", *args, **kw)
    _compare_outputs(o1, o2, 1e-5)
    for a, b, name in zip(g1, g2, ("student_hidden", "student_text_hidden", "student_weight", "student_bias")):
        _close(a, b, 1e-5, name)


def test_fused_linear_fp16():
    args = _hidden(2, 3, 16, 8, 97, torch.float16, seed=51)
    kw = dict(mode="vgs", temperature=1.0, mask=_mask(2, 3), vocab_size=97)
    o1, g1 = _run_linear("triton", *args, **kw)
    o2, g2 = _run_linear("reference", *args, **kw)
    _compare_outputs(o1, o2, 2e-3)
    for a, b, name in zip(g1, g2, ("student_hidden", "student_text_hidden", "student_weight", "student_bias")):
        assert a.dtype == torch.float16
        _close(a, b, 2e-2, name)


# ------------------------------------------------------------------ compiled mode, without a GPU

@pytest.mark.skipif(not INTERPRET, reason="the other tests run the compiled kernels")
def test_kernel_fits_sm90_registers_without_spills(tmp_path):
    """The interpreter does not type-check like the compiler, and says nothing of registers: compile the
    kernel for sm_90 with Triton's own compiler and ptxas (no GPU needed; in a subprocess where triton is
    not interpreting), at the driver's config for every launch and dtype and at every config the benchmarks
    sweep, and read registers, stack and local bytes with the cuobjdump Triton ships: at most 128
    registers (two 8-warp programs per SM) and no stack or spill bytes anywhere."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sass", "--check", "--json", str(out)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    from benchmarks.sass import LAUNCHES, REG_LIMIT, SWEEP

    seen = {(r["launch"], r["dtype"], r["per_thread"], r["warps"]) for r in rows}
    assert {(launch, "bf16") for launch in LAUNCHES} <= {k[:2] for k in seen}
    assert {("pass1", "bf16", *cfg) for cfg in SWEEP} <= seen
    for r in rows:
        where = f"{r['launch']} {r['dtype']} {r['per_thread']}x{r['warps']} warps"
        assert 0 < r["registers"] <= REG_LIMIT, f"{where}: {r['registers']} registers"
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{where}: stack {r['stack_bytes']} local {r['local_bytes']}"
        assert r["pass_a_instr_per_logit"] < 64, f"{where}: {r['pass_a_instr_per_logit']} instructions per logit"
