"""mode="standard" without the text-only view: None for both text streams gives the same loss and
gradients as passing them, skips their lm_head GEMMs, and reports the text metrics as NaN."""

import math

import pytest
import torch
from helpers import assert_close, backend_params, ragged_mask, random_logits
from torch.utils._python_dispatch import TorchDispatchMode

from vgs_kernels import VGSLoss, fused_linear_vgs_loss, vgs_loss

BACKENDS = backend_params(("reference", "torch", "cpu", "triton"))
TEXT_METRICS = ("vis", "lang", "vds", "gate_fraction", "threshold")


def _fused_inputs(seed=0, n_b=2, t=5, h=6, ht=8, v=37):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_b, t, h, generator=g), torch.randn(v, h, generator=g), torch.randn(v, generator=g),
            torch.randn(n_b, t, ht, generator=g), torch.randn(v + 3, ht, generator=g))


def _fused(backend, with_text, reduction="sequence", **kw):
    hs, ws, bs, ht, wt = (x.clone() for x in _fused_inputs())
    hsp, htp = torch.randn_like(hs), torch.randn_like(ht)
    for x in (hs, ws, bs):
        x.requires_grad_()
    out = fused_linear_vgs_loss(hs, hsp if with_text else None, ws, ht, htp if with_text else None, wt,
                                ragged_mask(2, 5), student_bias=bs, mode="standard", vocab_size=37,
                                reduction=reduction, backend=backend, chunk_size=3, temperature=0.7, **kw)
    out.loss.backward()
    return out, [x.grad for x in (hs, ws, bs)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("sequence", "token"))
def test_fused_standard_without_text_equals_with_text(backend, reduction):
    ref, ref_grads = _fused(backend, True, reduction, return_per_token=True)
    out, grads = _fused(backend, False, reduction, return_per_token=True)
    assert_close(out.loss.detach(), ref.loss.detach(), 1e-6, 1e-7, "loss")
    for name, g, r in zip(("student_hidden", "student_weight", "student_bias"), grads, ref_grads):
        assert_close(g, r, 1e-5, 1e-6, name)
    assert out.metrics["std"] == pytest.approx(ref.metrics["std"], rel=1e-6)
    assert all(math.isnan(out.metrics[k]) for k in TEXT_METRICS)
    assert not math.isnan(ref.metrics["vis"])
    torch.testing.assert_close(out.per_token["std"], ref.per_token["std"])
    assert torch.isnan(out.per_token["vis"]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_standard_without_text_equals_with_text(backend):
    zs, zsp, zt, ztp = random_logits(2, 5, 29, seed=3, v_teacher=31)
    mask = ragged_mask(2, 5)
    runs = []
    for with_text in (True, False):
        s = zs.clone().requires_grad_()
        out = vgs_loss(s, zsp if with_text else None, zt, ztp if with_text else None, mask, mode="standard",
                       vocab_size=29, backend=backend)
        out.loss.backward()
        runs.append((out, s.grad))
    (ref, ref_g), (out, g) = runs
    assert_close(out.loss.detach(), ref.loss.detach(), 1e-6, 1e-7, "loss")
    assert_close(g, ref_g, 1e-5, 1e-6, "student_logits")
    assert math.isnan(out.metrics["vis"]) and out.metrics["std"] == pytest.approx(ref.metrics["std"], rel=1e-6)


class _MatmulCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.out,
                    torch.ops.aten.mm.out):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_without_text_skips_the_text_gemms():
    hs, ws, _, ht, wt = _fused_inputs()
    counts = []
    for text in ((torch.randn_like(hs), torch.randn_like(ht)), (None, None)):
        with torch.no_grad(), _MatmulCount() as rec:  # forward only: 4 logit GEMMs per chunk with the text view
            fused_linear_vgs_loss(hs, text[0], ws, ht, text[1], wt, mode="standard", vocab_size=37,
                                  backend="torch", chunk_size=10)
        counts.append(rec.n)
    assert counts == [4, 2]  # one chunk of 10 rows


def test_none_text_streams_are_refused_outside_standard_mode():
    hs, ws, _, ht, wt = _fused_inputs()
    with pytest.raises(ValueError, match=r"student_text_hidden and teacher_text_hidden is None: mode='vgs' needs"):
        fused_linear_vgs_loss(hs, None, ws, ht, None, wt, mode="vgs", vocab_size=37)
    with pytest.raises(ValueError, match=r"teacher_text_hidden is None: pass both text-only streams or neither"):
        fused_linear_vgs_loss(hs, hs, ws, ht, None, wt, mode="standard", vocab_size=37)
    zs, zsp, zt, ztp = random_logits(1, 3, 11)
    with pytest.raises(ValueError, match=r"student_text_logits is None: mode='adaptive' needs"):
        vgs_loss(zs, None, zt, ztp, mode="adaptive")
    out = VGSLoss(mode="standard", vocab_size=37)(hs, None, ws, ht, None, wt)
    assert math.isnan(out.metrics["lang"]) and math.isfinite(float(out.loss))
