"""pytest-benchmark entry for the kernel cases: ``pytest benchmarks/ --benchmark-only``.

One shape per device (CPU: B*T 1024, H 256/512, V 32000, fp32; CUDA: B*T 8192, H 2048/4096,
V 151936, bf16); override with VGS_BENCH_BT / VGS_BENCH_VOCAB (and VGS_BENCH_DEVICE,
VGS_BENCH_THREADS). The cases are those of
``python -m benchmarks.kernels`` (every available VGS backend, Liger, plain PyTorch reverse KL, GEMM
floors); cases that cannot run here are skipped with the reason. Each benchmark's ``extra_info``
holds the case description and the peak memory of one call (see ``benchmarks/common.py``).

These are benchmarks, not tests: ``pytest tests`` does not collect them, and nothing here asserts
a speed.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from benchmarks import common as C
from benchmarks import kernels as K

pytest.importorskip("pytest_benchmark")

DEVICE = C.pick_device(os.environ.get("VGS_BENCH_DEVICE", "auto"))
if os.environ.get("VGS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["VGS_BENCH_THREADS"]))
_SHAPE = dict(bt=8192, hs=2048, ht=4096, vocab=151936, dtype=torch.bfloat16) if DEVICE.type == "cuda" else \
    dict(bt=1024, hs=256, ht=512, vocab=32000, dtype=torch.float32)
_SHAPE["bt"] = int(os.environ.get("VGS_BENCH_BT", _SHAPE["bt"]))
_SHAPE["vocab"] = int(os.environ.get("VGS_BENCH_VOCAB", _SHAPE["vocab"]))

_ARGS = argparse.Namespace(quick=False, liger_compiled="auto", floor_chunk=None, cases=None, skip_cases=None)
_CASES, _SKIPPED = K.select_cases(DEVICE, _ARGS)
_ALL = [c.name for c in _CASES] + sorted(_SKIPPED)


@pytest.fixture(scope="module")
def inputs():
    return K.make_inputs(_SHAPE["bt"], _SHAPE["hs"], _SHAPE["ht"], _SHAPE["vocab"], _SHAPE["dtype"], DEVICE)


@pytest.mark.parametrize("name", _ALL)
def test_kernel(benchmark, inputs, name):
    if name in _SKIPPED:
        pytest.skip(_SKIPPED[name])
    case = next(c for c in _CASES if c.name == name)
    fn = case.build(inputs)
    benchmark.group = f"{DEVICE.type} B*T={_SHAPE['bt']} V={_SHAPE['vocab']} H={_SHAPE['hs']}/{_SHAPE['ht']}"
    benchmark.extra_info.update(description=case.description, **{k: str(v) for k, v in _SHAPE.items()})

    def setup():
        inputs.clear_grads()
        C.sync(DEVICE)

    def call():
        fn()
        C.sync(DEVICE)

    rounds = 3 if DEVICE.type == "cpu" else 10
    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    mem = C.peak_memory(fn, inputs.clear_grads, DEVICE)
    benchmark.extra_info["peak_bytes"] = mem["peak_bytes"]
    benchmark.extra_info["memory_method"] = mem["method"]
    inputs.clear_grads()
    C.free_memory(DEVICE)
