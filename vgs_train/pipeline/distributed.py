"""Multi-process helpers for the VGS loss: global normalisers, metric reduction, and the sharded lm_head.

Data-parallel engines (DDP, FSDP2, DeepSpeed ZeRO-3) all *average* gradients over the ``world`` ranks.
The VGS loss of one rank is normalised by that rank's own counts (``reduction="token"``: its valid
tokens; ``reduction="sequence"``: its sequences with at least one valid token), so averaging those
gradients is not the gradient of the loss on the global batch when ranks hold different counts.
:func:`loss_scale` fixes that: multiply the rank's loss by

* ``token``:    ``n_valid_local * world / n_valid_global``
* ``sequence``: ``n_seq_local * world / n_seq_global``

(counts all-reduced over ranks), and the averaged gradient equals the single-process gradient on the
concatenated batch; the mean over ranks of the scaled losses equals the single-process loss. The VDS
threshold is already global (``vds_scope="global"`` all-gathers the VDS values, unequal counts allowed).

**The sharded lm_head (FSDP2 / ZeRO-3).** ``fused_linear_vgs_loss`` multiplies hidden states by the whole
``[V, H]`` lm_head weight chunk by chunk; under FSDP2 or ZeRO-3 each rank holds only a shard of it outside
the model's forward. The choice made here: **run the loss inside the wrapped model's forward, and inside
the lm_head module's own forward** (:func:`run_with_lm_head`, built on :func:`run_in_forward`, the
"forward redirection" that Lightning and TRL use). The engines' hooks then do what they do for any
forward:

* DDP: ``forward`` prepares the reducer for the backward that follows (no weight handling needed);
* FSDP2 (``fully_shard`` per decoder layer + the root, as ``configs/accelerate/fsdp2.yaml``): the
  lm_head is not inside a layer unit, so it belongs to the *root* unit, which the root's pre-forward
  hook all-gathers; FSDP2 never reshards the root after forward, so the weight stays whole until the
  backward, where FSDP's post-backward reduce-scatters (averages) its gradient into the shards as for
  every other parameter. Inside the redirected call ``lm_head.weight`` is the unsharded parameter;
* ZeRO-3: DeepSpeed gathers a module's parameters around that module's forward and, through hooks on
  that forward's tensor outputs, again for its backward; the loss (a tensor output of the redirected
  lm_head forward) gets those hooks, so the gradient lands on the gathered weight and is partitioned as
  usual. :func:`prepare_sharded_lm_head` also registers the weight as an external parameter of the root
  module (``deepspeed.zero.register_external_parameter``, for a tied lm_head used by the root).

``tests/train/test_distributed.py`` checks all three on 2 CPU processes (gloo) with ``torch.distributed``'s
DDP / ``fully_shard`` and ``deepspeed.initialize``: the averaged gradients equal the single-process
gradients on the concatenated batch. (accelerate 1.x cannot enable FSDP or DeepSpeed on a CPU-only
machine, so the trainer's FSDP2 / ZeRO-3 paths are exercised on GPUs only.)

So no engine-specific gather/scatter of gradients is written here: each engine keeps its own gradient
reduction.

**Why torch.distributed and not accelerate's collectives here.** These helpers serve any process group:
the trainer's (started by accelerate), TRL's, and the groups of trainers that call the loss directly
(verl / OpenRLHF style, the test harness's plain ``init_process_group``). ``accelerate.utils.reduce`` and
``gather_object`` consult accelerate's own process state instead of the group, and skip the collective
where that state says one process: a silent wrong number in a group accelerate did not start. The
trainer's own reductions (metrics, the stop signal) do use accelerate's (``Trainer._sum_over_ranks``,
``set_trigger`` / ``check_trigger``). The teacher never needs gradients: :func:`gathered_weight` gives a read-only whole weight
(``DTensor.full_tensor()`` / ``deepspeed.zero.GatheredParameters``) when the teacher is sharded too;
by default the teacher is replicated (inference only, no optimizer state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _comm_device(t: torch.Tensor | None = None) -> torch.device:
    """Device for small collective buffers: the current CUDA device for NCCL, else CPU (gloo)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values, device: torch.device | None = None) -> torch.Tensor:
    """Sum a list of numbers (or a tensor) over ranks in float64; returns a CPU float64 tensor."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if not is_distributed():
        return t
    buf = t.to(device or _comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


@dataclass(frozen=True)
class GlobalCounts:
    n_valid_local: int
    n_valid_global: int
    n_seq_local: int
    n_seq_global: int
    world: int

    def scale(self, reduction: str) -> float:
        """Factor for this rank's loss so that the DDP/FSDP gradient average is the global-batch gradient."""
        if reduction == "token":
            local, glob = self.n_valid_local, self.n_valid_global
        elif reduction == "sequence":
            local, glob = self.n_seq_local, self.n_seq_global
        else:
            raise ValueError(f"reduction must be 'sequence' or 'token', got {reduction!r}")
        return 0.0 if glob == 0 else local * self.world / glob


def global_counts(mask: torch.Tensor | None, shape: tuple[int, ...] | None = None) -> GlobalCounts:
    """Valid tokens and non-empty sequences of this rank and of all ranks (one all-reduce).

    ``mask``: [B, T] or [N] bool (None = all valid, then ``shape`` gives [B, T] or [N]). Every rank must
    call this (it is a collective), even with no valid token."""
    if mask is None:
        if shape is None:
            raise ValueError("global_counts: pass mask or shape")
        mask = torch.ones(shape, dtype=torch.bool)
    m = mask.bool()
    if m.dim() == 1:
        m = m.unsqueeze(0)  # [N] is one sequence, as in vgs_loss
    n_valid = int(m.sum())
    n_seq = int(m.any(dim=-1).sum())
    tot = all_reduce_sum([n_valid, n_seq], _comm_device(mask))
    return GlobalCounts(n_valid, int(tot[0]), n_seq, int(tot[1]), world_size())


def reduce_metrics(metrics: dict[str, float], weight: float, sum_keys: tuple[str, ...] = (),
                   mean_keys: tuple[str, ...] = (), *, sum_over_ranks: Callable | None = None) -> dict[str, float]:
    """Reduce per-rank numeric metrics over ranks in one all-reduce: by default a mean weighted by
    ``weight`` (this rank's valid tokens for the VGS metrics, which are means over valid tokens); keys in
    ``sum_keys`` are summed and keys in ``mean_keys`` averaged with equal weights (e.g. the scaled loss:
    the mean of the ranks' scaled losses is the global-batch loss). A NaN (a rank with no valid token)
    contributes nothing; non-numeric values are passed through. ``sum_over_ranks(list) -> tensor``: the
    all-reduce to use (default :func:`all_reduce_sum`; the trainer passes accelerate's)."""
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not is_distributed():
        return dict(metrics)
    vals = []
    for k in keys:
        v = float(metrics[k])
        w = 1.0 if (k in sum_keys or k in mean_keys) else float(weight)
        ok = v == v and w > 0
        vals += [v * w if ok else 0.0, w if ok else 0.0]
    tot = (sum_over_ranks or all_reduce_sum)(vals).tolist()
    out = dict(metrics)
    for i, k in enumerate(keys):
        s, w = tot[2 * i], tot[2 * i + 1]
        out[k] = s if k in sum_keys else (s / w if w > 0 else float("nan"))
    return out


def rank_share(indices: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous share of a global draw: every rank draws the same ``k * world`` indices from
    the same seeded sampler (so the sampler state is identical on all ranks: saved once, resumed
    everywhere) and keeps ``[rank * k, (rank + 1) * k)``; the ranks' shares, concatenated in rank order,
    are exactly the single-process batch."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if len(indices) % world:
        raise ValueError(f"rank_share: {len(indices)} indices do not split over {world} ranks")
    k = len(indices) // world
    return list(indices[rank_ * k:(rank_ + 1) * k])


def run_in_forward(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable, *args: Any, **kwargs: Any):
    """Call ``fn(*args, **kwargs)`` *inside* ``wrapper``'s forward (``wrapper`` wraps ``module``: a DDP /
    DeepSpeed engine, or ``module`` itself for FSDP2), so the engine's forward hooks run around it:
    FSDP2 unshards the root unit (the lm_head), ZeRO-3 gathers the root's parameters and registered
    external parameters, DDP prepares its reducer. Returns ``fn``'s result."""
    had_own = "forward" in module.__dict__  # e.g. accelerate's mixed-precision wrapper of forward
    original = module.forward

    def restore():
        if had_own:
            module.forward = original
        else:
            module.__dict__.pop("forward", None)

    def redirected(*_a, **_kw):
        restore()  # fn may call the real forward
        return fn(*_a, **_kw)

    module.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def prepare_sharded_lm_head(model: torch.nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, register the lm_head weight (and bias) as external parameters of the root
    module, so ZeRO-3 gathers them for the root's forward (where :func:`run_in_forward` runs the loss)
    and backward. A no-op for other engines (FSDP2's root unit already holds the lm_head)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    if not any(is_zero3_param(p) for p in params):
        return
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(inner, p)


@contextlib.contextmanager
def gathered_weight(param: torch.Tensor):
    """Read-only whole copy of a possibly sharded parameter (for the no-grad teacher): FSDP2 DTensor ->
    ``full_tensor()``; ZeRO-3 -> ``deepspeed.zero.GatheredParameters``; otherwise the tensor itself."""
    if is_zero3_param(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield param
        return
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # noqa: N806
    if isinstance(param, DTensor):
        with torch.no_grad():
            yield param.full_tensor()
        return
    yield param


def configure_deepspeed(accelerator, micro_batch: int, grad_accum: int) -> None:
    """Fill the DeepSpeed config values that ``accelerate`` cannot infer without a prepared dataloader:
    the micro-batch (rollouts per rank per micro-step, DeepSpeed's bookkeeping only) and the accumulation
    steps (DeepSpeed steps the optimizer itself at the boundary, so it must equal ``optim.grad_accum``)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = int(micro_batch)
    ds["gradient_accumulation_steps"] = int(grad_accum)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    accelerator.gradient_accumulation_steps = int(grad_accum)


@contextlib.contextmanager
def whole_init():
    """Load a model whole although ZeRO-3's partitioned init is on (the replicated, inference-only
    teacher). ``accelerate``'s ``zero3_init_context_manager(enable=False)`` re-registers a ZeRO-3 config,
    so transformers would still partition; this hides transformers' DeepSpeed config for the block."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


def run_with_lm_head(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable[[], Any]):
    """``fn()`` (which reads the lm_head weight, e.g. ``fused_linear_vgs_loss``) run inside the wrapped
    model's forward *and* inside the lm_head module's own forward:

    * DDP: the reducer is prepared by the wrapper's forward;
    * FSDP2: the root unit (which owns the lm_head) is unsharded by the root's forward;
    * ZeRO-3: DeepSpeed gathers ``lm_head.weight`` for the lm_head's forward and, through the hook it
      puts on that forward's tensor outputs, again for its backward (where the gradient lands on the
      whole parameter and is then reduce-scattered).

    ``fn`` should return a tensor or a tuple whose tensors carry the gradient (DeepSpeed hooks tensors,
    not arbitrary objects)."""
    head = unwrap(module).get_output_embeddings()
    return run_in_forward(wrapper, module, lambda: run_in_forward(head, head, fn))
