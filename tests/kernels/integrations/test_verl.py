"""The verl adapter against verl's own agg_loss applied to the reference's per-token VGS losses.

verl is installed by ``make test`` without its dependencies (see the Makefile); the test imports
verl's real ``agg_loss`` and reads the loss_agg_modes from its source, so a verl release that adds a
mode fails here until the adapter is checked against it.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from helpers import assert_close, backend_params

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (make install adds it)")
from vgs_kernels.integrations.verl import vgs_distillation_loss  # noqa: E402

agg_loss = core_algos.agg_loss
VERL_MODES = sorted(set(re.findall(r'"((?:token|seq)-[a-z-]+)"', inspect.getsource(agg_loss))))
ROW_BACKENDS = backend_params(("torch", "cpu", "triton"))
LENGTHS = [3, 0, 5, 2]
WIDTH = 7  # verl pads responses to the batch's response length
KW = dict(alpha=1.5, beta=0.3, gamma=0.6, temperature=0.8)


def test_verl_defines_the_modes_we_test():
    assert {"token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
            "seq-mean-token-sum-norm"} <= set(VERL_MODES)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, V = sum(LENGTHS), 23
    hidden = [torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g),
              torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)]
    ws, wt = torch.randn(V, 8, generator=g) * 0.5, torch.randn(V, 6, generator=g) * 0.5
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    mask = torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]
    mask[2, 3] = False  # a response position that does not count (e.g. a tool token)
    return hidden, ws, wt, cu, mask


def packed_positions(cu):
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return seq, torch.arange(int(cu[-1])) - cu[seq]


def expected(hidden, ws, wt, cu, mask, mode, info, **kw):
    """verl's agg_loss of the reference's per-token VGS losses, and the gradients by autograd."""
    hs, hsp = (h.double().clone().requires_grad_() for h in hidden[:2])
    w = ws.double().clone().requires_grad_()
    seq, pos = packed_positions(cu)
    logits = [hs @ w.T, hsp @ w.T, hidden[2].double() @ wt.double().T, hidden[3].double() @ wt.double().T]
    from vgs_kernels import vgs_loss

    per_token = vgs_loss(*logits, mask[seq, pos], reduction="none", backend="reference", **KW, **kw).loss
    loss_mat = torch.zeros(mask.shape, dtype=torch.float64).index_put((seq, pos), per_token)
    loss = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=mode, **info)
    loss.backward()
    return loss.detach(), [hs.grad, hsp.grad, w.grad]


INFOS = [{}, dict(dp_size=2, batch_num_tokens=17, global_batch_size=6, loss_scale_factor=None),
         dict(dp_size=1, loss_scale_factor=11)]


@pytest.mark.parametrize("backend", ["torch", *ROW_BACKENDS[1:]])
@pytest.mark.parametrize("mode", VERL_MODES)
def test_adapter_equals_verl_agg_loss_of_reference_per_token_losses(mode, backend):
    hidden, ws, wt, cu, mask = batch(seed=len(mode))
    infos = INFOS if backend == "torch" else INFOS[:1]
    for info in infos:
        want, want_grads = expected(hidden, ws, wt, cu, mask, mode, info)
        hs, hsp = (h.clone().requires_grad_() for h in hidden[:2])
        w = ws.clone().requires_grad_()
        loss, metrics = vgs_distillation_loss(hs, hsp, w, *hidden[2:], wt, cu, mask, loss_agg_mode=mode,
                                              global_batch_info=info, backend=backend, chunk_size=4, **KW)
        loss.backward()
        what = f"{mode} {info} {backend}"
        assert_close(loss.detach(), want, 1e-5, 1e-6, f"{what}: loss")
        for g, e, name in zip((hs.grad, hsp.grad, w.grad), want_grads, ("hidden", "text hidden", "lm_head")):
            assert_close(g, e, 1e-5, 1e-6, f"{what}: grad {name}")
        assert set(metrics) == {f"distillation/vgs_{k}" for k in
                                ("std", "vis", "lang", "vds", "gate_fraction", "threshold")}


def test_adapter_takes_a_packed_mask_nested_masks_and_refuses_bad_input():
    hidden, ws, wt, cu, mask = batch(seed=3)
    seq, pos = packed_positions(cu)
    common = (*hidden[:2], ws, *hidden[2:], wt, cu)
    padded, _ = vgs_distillation_loss(*common, mask, loss_agg_mode="seq-mean-token-mean", backend="torch")
    packed, _ = vgs_distillation_loss(*common, mask[seq, pos], loss_agg_mode="seq-mean-token-mean",
                                      backend="torch")
    assert packed.item() == pytest.approx(padded.item(), rel=1e-6)
    nested = torch.nested.nested_tensor([mask[i].float() for i in range(len(LENGTHS))], layout=torch.jagged)
    nested_loss, _ = vgs_distillation_loss(*common, nested, loss_agg_mode="seq-mean-token-mean", backend="torch")
    assert nested_loss.item() == pytest.approx(padded.item(), rel=1e-6)
    # the -norm mode divides by the padded width: with a packed mask it must be given
    with pytest.raises(ValueError, match="loss_scale_factor"):
        vgs_distillation_loss(*common, mask[seq, pos], loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="sets .*'reduction'"):
        vgs_distillation_loss(*common, mask, reduction="token")
    bad = mask.clone()
    bad[0, 5] = True  # past sequence 0's 3 rows
    with pytest.raises(ValueError, match="past a sequence's length"):
        vgs_distillation_loss(*common, bad)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        vgs_distillation_loss(*common, mask, loss_agg_mode="token-median")
    # no response token counts: loss 0 (verl's token-mean would divide 0 by 0)
    zero, _ = vgs_distillation_loss(*common, torch.zeros_like(mask), backend="torch")
    assert zero.item() == 0.0
