"""Scale-out: 2 CPU processes (gloo) -- the scaled per-rank VGS loss under DDP and FSDP2 gives the
single-process gradient on the concatenated batch; the accelerate / DeepSpeed configs parse."""

from __future__ import annotations

import gc
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from vgs_kernels import fused_linear_vgs_loss
from vgs_train.pipeline.distributed import (
    GlobalCounts,
    all_reduce_sum,
    gathered_weight,
    global_counts,
    rank_share,
    reduce_metrics,
    run_in_forward,
    run_with_lm_head,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H_IN, H, HT, V, T = 12, 16, 20, 40, 7
ROWS = [3, 2]  # rank 0 holds 3 sequences, rank 1 holds 2 (one of them with no valid token)


class Student(nn.Module):
    """Two 'decoder layers' (FSDP2 units) and an lm_head in the root unit, like a HF causal LM."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(H_IN, H), nn.Linear(H, H)])
        self.lm_head = nn.Linear(H, V, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def global_batch():
    g = torch.Generator().manual_seed(0)
    B = sum(ROWS)
    d = {
        "x": torch.randn(B, T, H_IN, generator=g), "xp": torch.randn(B, T, H_IN, generator=g),
        "ht": torch.randn(B, T, HT, generator=g), "htp": torch.randn(B, T, HT, generator=g),
        "wt": torch.randn(V, HT, generator=g) * 0.5,
    }
    lengths = torch.tensor([7, 3, 5, 0, 2])  # the rows of rank 1 are [0 tokens, 2 tokens]
    d["mask"] = torch.arange(T)[None] < lengths[:, None]
    return d


def make_student():
    torch.manual_seed(1)
    return Student()


def local_slice(d, r):
    lo, hi = sum(ROWS[:r]), sum(ROWS[: r + 1])
    return {k: (v if k == "wt" else v[lo:hi]) for k, v in d.items()}


def loss_fn(module, b, hs, hsp, reduction, scale_counts: GlobalCounts | None):
    # the single-process reference runs inside the workers too: its VDS scope is its own (whole) batch
    out = fused_linear_vgs_loss(hs, hsp, module.lm_head.weight, b["ht"], b["htp"], b["wt"], b["mask"],
                                mode="vgs", alpha=2.0, beta=0.5, gamma=0.7, reduction=reduction,
                                vds_scope="local" if scale_counts is None else "global")
    scale = 1.0 if scale_counts is None else scale_counts.scale(reduction)
    return out.loss * scale, out


def global_loss_value(scaled_loss) -> float:
    """The global-batch loss from each rank's scaled loss: their mean over ranks."""
    return float(all_reduce_sum([float(scaled_loss.detach())])[0]) / dist.get_world_size()


def reference(reduction):
    """Single process, whole batch: loss, threshold and gradients."""
    d = global_batch()
    m = make_student()
    loss, out = loss_fn(m, d, m(d["x"]), m(d["xp"]), reduction, None)
    loss.backward()
    return float(loss.detach()), out.metrics, {n: p.grad.clone() for n, p in m.named_parameters()}


def _worker(r, world, init_file, errors_dir, engines):
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world))  # as a launcher would
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=world)
        if "zero3" in engines:
            import deepspeed
            import deepspeed.ops

            # deepspeed's TorchBackend JIT-compiles a shared-memory all-reduce for CPU ranks (a minute of g++
            # on a fresh 2-core machine); gloo does the reductions checked here, so the op is marked unbuildable
            deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}
            deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group above
        for engine in engines:
            for reduction in ("sequence", "token"):
                _check(r, world, engine, reduction)
        assert reduce_metrics({"a": float(r), "n": 2.0, "s": 1.0}, weight=r + 1, sum_keys=("s",), mean_keys=("n",)) \
            == {"a": 2 / 3, "n": 2.0, "s": 2.0}
        with open(os.path.join(errors_dir, f"done{r}.txt"), "w") as f:
            f.write(",".join(engines))
        # FSDP2's module state is cyclic: free it (and the gloo work objects it holds) while the process group
        # is alive, else gloo's threads can abort the process at interpreter exit (1 run in ~12 without this)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(errors_dir, f"rank{r}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _check(r, world, engine, reduction):
    ref_loss, ref_metrics, ref_grads = reference(reduction)
    b = local_slice(global_batch(), r)
    module = make_student()
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapper = DDP(module)
    elif engine == "zero3":
        import deepspeed

        from vgs_train.pipeline.distributed import prepare_sharded_lm_head

        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "zero_allow_untested_optimizer": True,
               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        opt = torch.optim.SGD(module.parameters(), lr=0.0)
        wrapper, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
        assert module.lm_head.weight.numel() == 0  # partitioned outside the forward
        prepare_sharded_lm_head(wrapper)
    else:  # FSDP2: one unit per layer + the root (which owns the lm_head)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in module.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        wrapper = module
        from torch.distributed.tensor import DTensor

        w = module.lm_head.weight  # sharded outside the forward: rank r holds V / world rows
        assert isinstance(w, DTensor) and tuple(w.to_local().shape) == (V // world, H)
    counts = global_counts(b["mask"])
    hs, hsp = wrapper(b["x"]), wrapper(b["xp"])
    # the loss runs inside the wrapper's and the lm_head's forward (as the trainer does): FSDP2 / ZeRO-3
    # hold the whole lm_head weight there
    loss, out = run_with_lm_head(wrapper, module, lambda: loss_fn(module, b, hs, hsp, reduction, counts))
    if engine == "fsdp2":
        assert tuple(module.lm_head.weight.shape) == (V, H)
    if engine == "zero3":
        wrapper.backward(loss)
    else:
        loss.backward()
    assert abs(global_loss_value(loss) - ref_loss) < 1e-5, (global_loss_value(loss), ref_loss)
    assert abs(out.metrics["threshold"] - ref_metrics["threshold"]) < 1e-6
    m = reduce_metrics(out.metrics, weight=counts.n_valid_local)
    for k in ("std", "vis", "lang", "vds", "gate_fraction"):
        assert abs(m[k] - ref_metrics[k]) < 1e-5, (k, m[k], ref_metrics[k])
    # the read-only gather used for a sharded (no-grad) teacher gives the whole weight outside any forward
    with gathered_weight(module.lm_head.weight) as w:
        torch.testing.assert_close(w.detach(), make_student().lm_head.weight.detach())
    for n, p in module.named_parameters():
        if engine == "zero3":
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=f"{engine} {reduction} {n}")


def _spawn(tmp_path, engines):
    errors = tmp_path / "errors"
    errors.mkdir()
    try:
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(errors), engines), nprocs=2, join=True)
    except Exception:
        msgs = "\n".join(p.read_text() for p in sorted(errors.glob("rank*.txt")))
        pytest.fail(f"{engines} worker failed:\n{msgs}")
    for r in range(2):
        assert (errors / f"done{r}.txt").read_text() == ",".join(engines)


def _engines() -> tuple[str, ...]:
    engines = ["ddp"]
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        engines.append("fsdp2")
    except ImportError:
        pass
    try:
        import deepspeed  # noqa: F401  (optional extra)

        engines.append("zero3")
    except Exception:  # noqa: BLE001 - deepspeed raises various errors where it cannot run
        pass
    return tuple(engines)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_engines_scaled_loss_equal_single_process(tmp_path):
    """One spawn (the start-up dominates): DDP, FSDP2 (fully_shard on CPU/gloo) where this torch has it, and
    DeepSpeed ZeRO-3 where deepspeed is installed; each with sequence and token reductions, unequal rows
    and valid tokens per rank; the loss runs inside the engine's forward (run_in_forward)."""
    _spawn(tmp_path, _engines())


def test_run_in_forward_restores_forward():
    m = Student()
    calls = []
    assert run_in_forward(m, m, lambda: calls.append(1) or 7) == 7 and calls == [1]
    assert "forward" not in m.__dict__  # the class's forward again
    x = torch.randn(2, H_IN)
    torch.testing.assert_close(m(x), Student.forward(m, x))


def test_counts_and_scale_single_process():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    c = global_counts(mask)
    assert (c.n_valid_local, c.n_valid_global, c.n_seq_local, c.n_seq_global, c.world) == (3, 3, 2, 2, 1)
    assert c.scale("token") == 1.0 and c.scale("sequence") == 1.0
    assert GlobalCounts(2, 8, 1, 4, 2).scale("token") == 0.5
    assert GlobalCounts(0, 0, 0, 0, 2).scale("sequence") == 0.0
    with pytest.raises(ValueError, match="reduction"):
        c.scale("mean")
    assert rank_share(list(range(8)), 1, 2) == [4, 5, 6, 7] and rank_share([3, 1], 0, 1) == [3, 1]
    with pytest.raises(ValueError, match="split"):
        rank_share([1, 2, 3], 0, 2)


# ---------------------------------------------------------------- configs


def _load_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(os.path.join(ROOT, "configs", "accelerate", f"{name}.yaml"))


def test_accelerate_ddp_and_fsdp2_configs():
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert _load_accelerate("ddp").distributed_type.value == "MULTI_GPU"
    c = _load_accelerate("fsdp2")
    assert c.distributed_type.value == "FSDP"
    fc = {k.removeprefix("fsdp_"): v for k, v in c.fsdp_config.items()}
    assert fc["version"] == 2 and fc["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    classes = fc["transformer_layer_cls_to_wrap"].split(",")
    from transformers.models.qwen3_vl import modeling_qwen3_vl as q

    assert all(hasattr(q, c) for c in classes), classes
    assert set(classes) == set(q.Qwen3VLForConditionalGeneration._no_split_modules)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy=fc["auto_wrap_policy"], transformer_cls_names_to_wrap=classes,
        reshard_after_forward=fc["reshard_after_forward"], state_dict_type=fc["state_dict_type"],
        cpu_ram_efficient_loading=fc["cpu_ram_efficient_loading"], sync_module_states=fc["sync_module_states"])
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True


def test_zero3_config_parses():
    from accelerate.utils import DeepSpeedPlugin

    c = _load_accelerate("zero3")
    assert c.distributed_type.value == "DEEPSPEED"
    d = c.deepspeed_config
    assert d["zero_stage"] == 3
    plugin = DeepSpeedPlugin(
        zero_stage=d["zero_stage"], gradient_accumulation_steps=d["gradient_accumulation_steps"],
        gradient_clipping=d["gradient_clipping"], offload_optimizer_device=d["offload_optimizer_device"],
        offload_param_device=d["offload_param_device"], zero3_init_flag=d["zero3_init_flag"],
        zero3_save_16bit_model=d["zero3_save_16bit_model"])
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # deepspeed is an optional extra; accelerate's own parsing above still ran
        return
    assert int(DeepSpeedZeroConfig(**ds["zero_optimization"]).stage) == 3


@pytest.mark.parametrize("name,gamma", [("qwen3vl-8b-to-2b-vgs", 0.41), ("qwen3vl-8b-to-4b-vgs", 0.36)])
def test_paper_configs_load(name, gamma):
    from vgs_train.config import load_config

    path = os.path.join(ROOT, "configs", "paper", f"{name}.yaml")
    cfg = load_config(path)
    assert cfg.loss.method == "vgs" and cfg.loss.alpha == 2.0 and cfg.loss.beta == 0.01
    assert cfg.loss.gamma == gamma and cfg.loss.temperature == 1.0
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.01
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0 and cfg.rollout.max_new_tokens == 2048
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert "Qwen3-VL-8B" in raw["model"]["teacher"] and "Vision-SR1" in raw["data"]["train"].replace("vision-sr1", "Vision-SR1")
    # global batch 512 on 8 GPUs
    assert cfg.optim.batch_size * cfg.optim.grad_accum * 8 == 512
