"""The predicted gate of mode='vgs' (driver.run_vgs): pass 1 sends on the language gradient of the rows
whose VDS exceeds the running quantile, pass 2 corrects the mispredicted rows with signed coefficients.
The result must be exactly the gated loss whatever the prediction got wrong."""

import pytest
import torch
from helpers import assert_close, row_cases

from vgs_kernels import fused_linear_vgs_loss

CASES = row_cases(cpu=("torch", "cpu"))


def _inputs(n_seq, t, v, hs, ht, seed, ascending_vds):
    """Hidden states whose teacher views differ more and more along the rows when ``ascending_vds``
    (the running quantile of the early chunks is then far too low: many predicted rows are wrong)."""
    g = torch.Generator().manual_seed(seed)
    hs_, hsp = torch.randn(n_seq, t, hs, generator=g), torch.randn(n_seq, t, hs, generator=g)
    ht_ = torch.randn(n_seq, t, ht, generator=g)
    spread = torch.linspace(0.05, 2.0, n_seq * t).reshape(n_seq, t, 1) if ascending_vds else 1.0
    htp = ht_ + spread * torch.randn(n_seq, t, ht, generator=g)
    ws, wt = torch.randn(v, hs, generator=g) * 0.5, torch.randn(v, ht, generator=g) * 0.5
    return hs_, hsp, ws, ht_, htp, wt


def _run(backend, tensors, device="cpu", **kw):
    hs, hsp, ws, ht, htp, wt = (t.clone().to(device) for t in tensors)
    for t in (hs, hsp, ws):
        t.requires_grad_()
    out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, backend=backend, return_per_token=True, **kw)
    out.loss.backward()
    return out, [hs.grad, hsp.grad, ws.grad]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("ascending", [True, False])
def test_mispredicted_rows_are_corrected_exactly(pass2, device, backend, ascending):
    tensors = _inputs(4, 40, 60, 12, 16, seed=1, ascending_vds=ascending)
    kw = dict(mode="vgs", gamma=0.41, beta=0.5, chunk_size=16)  # a large beta: the language term shows
    ref, ref_grads = _run("reference", tensors, **kw)
    got, grads = _run(backend, tensors, device, **kw)
    assert_close(got.loss.detach(), ref.loss.detach(), 1e-5, 1e-6, "loss")
    assert torch.equal(got.per_token["gate"].cpu(), ref.per_token["gate"])
    for g, r, name in zip(grads, ref_grads, ("student_hidden", "student_text_hidden", "student_weight")):
        assert_close(g, r, 1e-4, 1e-5, name)
    n, gated = 160, int(ref.per_token["gate"].sum())
    if ascending:  # the prediction was badly off: corrections in both directions happened
        assert pass2.rows > 0.2 * n
    assert pass2.rows < gated + n  # never more than recomputing everything once


def test_fixed_threshold_needs_no_correction(pass2):
    tensors = _inputs(2, 30, 40, 8, 10, seed=2, ascending_vds=True)
    out, _ = _run("torch", tensors, mode="vgs", threshold=0.3, chunk_size=8)
    assert out.metrics["gate_fraction"] > 0 and pass2.rows == 0


def test_iid_rows_need_few_corrections(pass2):
    """4096 rows in chunks of 512 with the default quantile: only rows near the threshold move."""
    tensors = _inputs(8, 512, 64, 16, 16, seed=3, ascending_vds=False)
    out, _ = _run("torch", tensors, mode="vgs", chunk_size=512)
    assert out.metrics["gate_fraction"] == pytest.approx(0.3, abs=0.01)
    assert pass2.rows < 0.05 * 4096, pass2.rows
