"""vds_scope="global": the threshold is the quantile over every rank's valid tokens (gloo, 2 CPU ranks)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import random_logits

from vgs_kernels import vgs_loss


def _worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits = random_logits(2, 6, 20, seed=1)
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[0, 4:] = False  # ranks hold different numbers of valid tokens
        # rank 0 takes sequence 0 (4 valid), rank 1 sequence 1 (6 valid)
        local = [z[rank : rank + 1] for z in logits]
        out = vgs_loss(*local, mask[rank : rank + 1], backend="torch", vds_scope="global")
        local_out = vgs_loss(*local, mask[rank : rank + 1], backend="torch", vds_scope="local")
        torch.save({"global": out.metrics["threshold"], "local": local_out.metrics["threshold"]},
                   f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_global_threshold_equals_single_process_threshold():
    logits = random_logits(2, 6, 20, seed=1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    single = vgs_loss(*logits, mask, backend="torch").metrics["threshold"]
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_worker, args=(2, init_file, result_file), nprocs=2, join=True)
        results = [torch.load(f"{result_file}.{r}", weights_only=True) for r in range(2)]
    for r in results:
        assert r["global"] == pytest.approx(single, rel=1e-6)
    assert any(r["local"] != pytest.approx(single, rel=1e-6) for r in results)
