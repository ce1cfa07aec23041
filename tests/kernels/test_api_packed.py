"""Packed rows (cu_seqlens=) against the padded [B, T] call, the batch threshold helper
(vds_threshold), and the VDS all-gather's process group (2 gloo ranks)."""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close, backend_params, random_logits

from vgs_kernels import fused_linear_vgs_loss, vds_threshold, vgs_loss

ROW_BACKENDS = backend_params(("torch", "cpu", "triton"))
LENGTHS = [3, 0, 5, 1]  # an empty sequence among them
T = max(LENGTHS)


def padded_layout():
    """mask [B, T] (the sequences' lengths, one masked token inside), and the packed row of each
    padded position (or -1)."""
    B = len(LENGTHS)
    within = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask = within.clone()
    mask[2, 1] = False  # masked inside a sequence (e.g. a tool token)
    packed_of = torch.full((B, T), -1)
    packed_of[within] = torch.arange(int(within.sum()))
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    return within, mask, packed_of, cu


def pack(x, within):
    return x[within]


def unpack(x, within):
    if x is None:  # no gradient (the text stream in mode="standard" on the reference)
        return None
    out = torch.zeros(*within.shape, *x.shape[1:], dtype=x.dtype)
    out[within] = x
    return out


@pytest.mark.parametrize("backend", ["reference", *ROW_BACKENDS])
def test_packed_logits_equal_the_padded_call(backend):
    within, mask, _, cu = padded_layout()
    logits = random_logits(len(LENGTHS), T, 31, seed=3)
    w = torch.rand(len(LENGTHS), T, generator=torch.Generator().manual_seed(1))
    cases = [("vgs", "sequence", None), ("adaptive", "sequence", w), ("language", "token", w),
             ("standard", "sum", None)]
    for mode, reduction, weights in cases[:2] if backend == "triton" else cases:
        kw = dict(mode=mode, reduction=reduction, backend=backend, gamma=0.6, return_per_token=True)
        zs, zsp = (z.clone().requires_grad_() for z in logits[:2])
        pad = vgs_loss(zs, zsp, *logits[2:], mask, weights=weights, **kw)
        pad.loss.backward()
        ps, psp = (pack(z, within).detach().requires_grad_() for z in logits[:2])
        packed = vgs_loss(ps, psp, *(pack(z, within) for z in logits[2:]), pack(mask, within),
                          weights=None if weights is None else pack(weights, within), cu_seqlens=cu, **kw)
        packed.loss.backward()
        what = f"{backend} {mode} {reduction} weights={weights is not None}"
        assert_close(packed.loss.detach(), pad.loss.detach(), 1e-6, 1e-7, f"{what}: loss")
        assert_close(unpack(ps.grad, within), zs.grad, 1e-6, 1e-7, f"{what}: grad student")
        assert_close(unpack(psp.grad, within), zsp.grad, 1e-6, 1e-7, f"{what}: grad student_text")
        for k, v in pad.per_token.items():
            assert_close(unpack(packed.per_token[k], within), v, 1e-6, 1e-7, f"{what}: {k}")
    # without cu_seqlens the packed rows are one sequence: a different sequence mean
    padded = vgs_loss(*logits, mask, backend=backend).loss
    one = vgs_loss(*(pack(z, within) for z in logits), pack(mask, within), backend=backend).loss
    assert one.item() != pytest.approx(padded.item(), rel=1e-3)


@pytest.mark.parametrize("backend", ["reference", *ROW_BACKENDS])
def test_packed_hidden_states_equal_the_padded_call(backend):
    within, mask, _, cu = padded_layout()
    g = torch.Generator().manual_seed(5)
    B, V = len(LENGTHS), 19
    hidden = [torch.randn(B, T, 8, generator=g), torch.randn(B, T, 8, generator=g),
              torch.randn(B, T, 6, generator=g), torch.randn(B, T, 6, generator=g)]
    ws, wt = torch.randn(V, 8, generator=g) * 0.5, torch.randn(V, 6, generator=g) * 0.5
    results = []
    for packed in (False, True):
        hs, hsp = ((pack(h, within) if packed else h).clone().requires_grad_() for h in hidden[:2])
        ht, htp = (pack(h, within) if packed else h for h in hidden[2:])
        w = ws.clone().requires_grad_()
        out = fused_linear_vgs_loss(hs, hsp, w, ht, htp, wt, pack(mask, within) if packed else mask,
                                    cu_seqlens=cu if packed else None, backend=backend, chunk_size=3)
        out.loss.backward()
        grads = [unpack(hs.grad, within) if packed else hs.grad, unpack(hsp.grad, within) if packed else hsp.grad,
                 w.grad]
        results.append((out.loss.detach(), grads))
    assert_close(results[1][0], results[0][0], 1e-6, 1e-7, "loss")
    for a, b, name in zip(results[1][1], results[0][1], ("student_hidden", "student_text_hidden", "weight")):
        assert_close(a, b, 1e-5, 1e-6, f"grad {name}")


# ------------------------------------------------------------------ vds_threshold


def test_vds_threshold_equals_the_loss_threshold():
    logits = random_logits(3, 6, 25, seed=7)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    ref = vgs_loss(*logits, mask, backend="reference", return_per_token=True)
    thr = vds_threshold(logits[2], logits[3], mask)
    assert thr.threshold == pytest.approx(ref.metrics["threshold"], rel=1e-6)
    assert_close(thr.vds, ref.per_token["vds"], 1e-5, 1e-6, "vds")
    assert torch.equal(thr.gate, ref.per_token["gate"].bool())
    low, high = vds_threshold(logits[2], logits[3], mask, mode="adaptive").threshold
    want = torch.quantile(ref.per_token["vds"][mask].double(), torch.tensor([0.4, 0.7], dtype=torch.float64))
    assert (low, high) == pytest.approx(want.tolist(), rel=1e-6)
    # hidden states + the teacher's lm_head (chunked) give the logits' values
    g = torch.Generator().manual_seed(4)
    ht, htp, wt, bt = torch.randn(3, 6, 5, generator=g), torch.randn(3, 6, 5, generator=g), \
        torch.randn(25, 5, generator=g), torch.randn(25, generator=g)
    a = vds_threshold(ht, htp, mask, teacher_weight=wt, teacher_bias=bt, chunk_size=4, vocab_size=20)
    b = vds_threshold(ht @ wt.T + bt, htp @ wt.T + bt, mask, vocab_size=20)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-5)
    with pytest.raises(ValueError, match=r"teacher_text has -inf"):
        zt = logits[3].clone()
        zt[0, 0, :10] = float("-inf")
        vds_threshold(logits[2], zt)


def test_batch_threshold_makes_micro_batches_add_up():
    """The recipe for micro-batching: one threshold over the batch, threshold= (or gate=) per
    micro-batch, reduction='sum' and a batch-wide normaliser."""
    logits = random_logits(4, 5, 23, seed=8)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(6)) > 0.25
    n = mask.sum()
    full = vgs_loss(*logits, mask, reduction="token", backend="torch").loss
    thr = vds_threshold(logits[2], logits[3], mask, vds_scope="local")
    parts_thr = sum(vgs_loss(*(z[i:i + 2] for z in logits), mask[i:i + 2], reduction="sum",
                             threshold=thr.threshold, backend="torch").loss for i in (0, 2)) / n
    parts_gate = sum(vgs_loss(*(z[i:i + 2] for z in logits), mask[i:i + 2], reduction="sum",
                              gate=thr.gate[i:i + 2], backend="torch").loss for i in (0, 2)) / n
    assert parts_thr.item() == pytest.approx(full.item(), rel=1e-5)
    assert parts_gate.item() == pytest.approx(full.item(), rel=1e-5)
    # each micro-batch's own quantile would give a different loss
    own = sum(vgs_loss(*(z[i:i + 2] for z in logits), mask[i:i + 2], reduction="sum", vds_scope="local",
                       backend="torch").loss for i in (0, 2)) / n
    assert own.item() != pytest.approx(full.item(), rel=1e-4)


# ------------------------------------------------------------------ process groups (2 gloo ranks)


def _worker(rank, world, init_file, result_file):
    # a timeout turns a collective that one rank never joins into an error instead of a hang
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        logits = random_logits(2, 6, 20, seed=1)
        local = [z[rank:rank + 1] for z in logits]
        group = dist.new_group([0, 1])
        out["default"] = vgs_loss(*local, backend="torch").metrics["threshold"]
        out["group"] = vgs_loss(*local, backend="torch", process_group=group).metrics["threshold"]
        out["helper"] = vds_threshold(local[2], local[3], process_group=group).threshold
        # no collective with threshold= / gate= / "local": rank 0 makes extra calls, and the next
        # global-scope call still pairs with rank 1's
        if rank == 0:
            vgs_loss(*local, backend="torch", threshold=0.1)
            vgs_loss(*local, backend="torch", vds_scope="local")
            vgs_loss(*local, backend="torch", gate=torch.ones(1, 6, dtype=torch.bool))
            vds_threshold(local[2], local[3], vds_scope="local")
        out["after"] = vgs_loss(*local, backend="torch").metrics["threshold"]
    finally:
        torch.save(out, f"{result_file}.{rank}")
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_process_group_and_calls_without_a_collective():
    logits = random_logits(2, 6, 20, seed=1)
    single = vgs_loss(*logits, backend="torch").metrics["threshold"]
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_worker, args=(2, init_file, result_file), nprocs=2, join=True)
        results = [torch.load(f"{result_file}.{r}", weights_only=True) for r in range(2)]
    for r in results:
        for k in ("default", "group", "helper", "after"):
            assert r[k] == pytest.approx(single, rel=1e-6), k
