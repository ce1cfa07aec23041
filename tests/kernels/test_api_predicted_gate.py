"""The trainer-facing options (weights=, cu_seqlens=, gate=, reduction="none", sparse-teacher checks)
through the driver's predicted gate and its in-place, logits-dtype, power-of-two-scaled gradients.

* gate= is the final gate, so pass 1 takes it as the prediction: pass 2 has nothing to correct.
* weights= and cu_seqlens= make the reduction weights that the pass-2 corrections (signed
  coefficients beta * (gate - predicted) * w) must carry.
* reduction="none" reads each row's full logit gradient from the driver: with fp16 logits that
  gradient was scaled by a power of two before rounding, and the scale must be undone.
* the fused path's GEMMs span the full lm_head rows: a teacher bias that masks only the padding ids
  [vocab_size, V) is no sparse teacher.

Compared with the materialised reference (fp64 where the inputs are fp16).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, backend_params

from vgs_kernels import fused_linear_vgs_loss, vgs_loss

ROW_BACKENDS = backend_params(("torch", "cpu"))
KW = dict(mode="vgs", alpha=2.0, beta=0.5, gamma=0.41)  # a large beta: the language term shows
TOL = (1e-4, 1e-5)
N_SEQ, T = 4, 30
CU = torch.tensor([0, 20, 20, 55, 90, 120])  # packed rows of five sequences, one of them empty


def _hidden(seed, hs=12, ht=16, v=50):
    """Packed [N, H] rows whose teacher views differ more and more along the rows: the running
    quantile of the early chunks is far too low, so the prediction is often wrong."""
    g = torch.Generator().manual_seed(seed)
    n = N_SEQ * T
    h_s, h_sp, h_t = torch.randn(n, hs, generator=g), torch.randn(n, hs, generator=g), torch.randn(n, ht, generator=g)
    h_tp = h_t + torch.linspace(0.05, 2.0, n)[:, None] * torch.randn(n, ht, generator=g)
    ws, wt = torch.randn(v, hs, generator=g) * 0.5, torch.randn(v, ht, generator=g) * 0.5
    return h_s, h_sp, ws, h_t, h_tp, wt


def _weights(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) * 2 - 0.5  # some negative, e.g. advantages
    w[3] = 0.0
    return w


def _fused(backend, tensors, **kw):
    hs, hsp, ws, ht, htp, wt = (t.clone() for t in tensors)
    for t in (hs, hsp, ws):
        t.requires_grad_()
    out = fused_linear_vgs_loss(hs, hsp, ws, ht, htp, wt, backend=backend, chunk_size=16, return_per_token=True,
                                **KW, **kw)
    out.loss.backward()
    return out, [hs.grad, hsp.grad, ws.grad]


def _logits(tensors):
    hs, hsp, ws, ht, htp, wt = tensors
    return [hs @ ws.T, hsp @ ws.T, ht @ wt.T, htp @ wt.T]


def _on_logits(backend, logits, upstream=None, **kw):
    zs, zsp = (z.clone().requires_grad_() for z in logits[:2])
    out = vgs_loss(zs, zsp, logits[2], logits[3], backend=backend, return_per_token=True, **{**KW, **kw})
    out.loss.backward(torch.ones_like(out.loss) if upstream is None else upstream)
    return out, [zs.grad, zsp.grad]


def _same(got, want, what):
    (out, grads), (ref, ref_grads) = got, want
    assert_close(out.loss.detach(), ref.loss.detach(), *TOL, f"{what}: loss")
    for g, r, i in zip(grads, ref_grads, range(3)):
        assert_close(g, r, *TOL, f"{what}: grad {i}")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_a_given_gate_is_the_prediction_and_pass_2_corrects_nothing(backend, pass2):
    tensors = _hidden(seed=1)
    n = N_SEQ * T
    gate = torch.rand(n, generator=torch.Generator().manual_seed(2)) > 0.6  # unrelated to the VDS
    kw = dict(gate=gate, weights=_weights(n, seed=3), cu_seqlens=CU, reduction="sequence")
    _same(_fused(backend, tensors, **kw), _fused("reference", tensors, **kw), "fused gate=")
    logits = _logits(tensors)
    _same(_on_logits(backend, logits, **kw), _on_logits("reference", logits, **kw), "logits gate=")
    assert pass2.rows == 0
    # the same inputs with the quantile gate: the running prediction is wrong on many rows
    _fused(backend, tensors, weights=kw["weights"])
    assert pass2.rows > 0.1 * n


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("reduction", ["sequence", "sum"])
def test_weights_and_packed_sequences_reach_the_corrections(backend, reduction, pass2):
    tensors = _hidden(seed=4)
    n = N_SEQ * T
    kw = dict(weights=_weights(n, seed=5), cu_seqlens=CU, reduction=reduction)
    got = _fused(backend, tensors, **kw)
    want = _fused("reference", tensors, **kw)
    _same(got, want, f"fused {reduction}")
    assert torch.equal(got[0].per_token["gate"], want[0].per_token["gate"])
    assert pass2.rows > 0.1 * n  # corrections in pass 2 happened, carrying the weights
    logits = _logits(tensors)
    _same(_on_logits(backend, logits, **kw), _on_logits("reference", logits, **kw), f"logits {reduction}")


FP16_SUBNORMAL_STEP = 2.0**-24


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("small_weights", [False, True], ids=["weights1", "weights2^-12"])
def test_reduction_none_undoes_the_fp16_gradient_scale(backend, small_weights):
    """Per-token losses of fp16 logits with a random upstream gradient. The driver's power-of-two scale
    is 2^-1 for weight-1 rows (coefficients up to gamma * (1 + alpha + beta) = 3.5) and 2^11 or 2^12 for
    weights ~2^-12 (a caller folding 1/N into its weights): both must be undone in the gradients."""
    g = torch.Generator().manual_seed(6)
    n, v = 96, 70
    logits = [(torch.randn(n, v, generator=g) * 2).half() for _ in range(4)]
    logits[3] = (logits[2].float() + torch.randn(n, v, generator=g)).half()
    upstream = torch.randn(n, generator=g).half()
    weights = (torch.rand(n, generator=g) + 0.5) * 2.0**-12 if small_weights else None
    kw = dict(reduction="none", weights=weights, gamma=1.0)
    out, grads = _on_logits(backend, logits, upstream, **kw)
    ref, ref_grads = _on_logits("reference", [z.double() for z in logits], upstream.double(), **kw)
    assert out.loss.shape == (n,)
    assert torch.equal(out.per_token["gate"], ref.per_token["gate"])  # the quantile gate, with corrections
    assert_close(out.loss.detach(), ref.loss.detach(), 1e-3, 1e-3, "per-token loss")
    for a, b, name in zip(grads, ref_grads, ("student_logits", "student_text_logits")):
        assert a.dtype == torch.float16
        a, b = a.double(), b.double()
        atol = 1e-2 * b.abs().max().item() + FP16_SUBNORMAL_STEP
        torch.testing.assert_close(a, b, rtol=1e-2, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_a_teacher_bias_masking_only_the_padding_ids_is_not_a_sparse_teacher(backend):
    """vocab_size < V: the fused GEMMs span all V rows of the heads, the row kernels read [0, vocab)."""
    hs, hsp, ws, ht, htp, wt = _hidden(seed=7)
    vocab = ws.shape[0] - 6
    bt = torch.randn(ws.shape[0], generator=torch.Generator().manual_seed(8))
    bt[vocab:] = float("-inf")  # e.g. a head that masks the ids the tokenizer does not have
    kw = dict(vocab_size=vocab, teacher_bias=bt)
    got = _fused(backend, (hs, hsp, ws, ht, htp, wt), **kw)
    want = _fused("reference", (hs, hsp, ws, ht, htp, wt), **kw)
    assert torch.isfinite(got[0].loss)
    _same(got, want, "padding-masked teacher bias")
    assert (got[1][2][vocab:] == 0).all()  # no gradient into the padding rows of the student head
    bt[vocab - 1] = float("-inf")  # a real id: the sparse-teacher error
    with pytest.raises(ValueError, match=r"teacher_bias has -inf .* full teacher logits"):
        _fused(backend, (hs, hsp, ws, ht, htp, wt), **kw)
