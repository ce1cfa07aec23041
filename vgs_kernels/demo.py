"""A short real run of the loss API: random hidden states at a Qwen3-VL-like shape scaled to CPU.

    python -m vgs_kernels.demo [--tokens 1024] [--vocab 32000]

Prints the VGS metrics and, per available backend, the forward+backward time and the largest
tensor allocated, next to the materialised reference.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import backends, fused_linear_vgs_loss
from .backends import is_available


def _largest_allocation(fn) -> tuple[float, int]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
            return out

    start = time.perf_counter()
    with Largest() as rec:
        fn()
    return time.perf_counter() - start, rec.largest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="response tokens per sequence")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden-student", type=int, default=256)
    parser.add_argument("--hidden-teacher", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    b, t, v = args.batch, args.seq, args.vocab
    hs, ht = args.hidden_student, args.hidden_teacher
    student = [torch.randn(b, t, hs, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(b, t, ht) for _ in range(2)]
    ws = (torch.randn(v, hs) * hs**-0.5).requires_grad_()
    wt = torch.randn(v, ht) * ht**-0.5
    mask = torch.arange(t)[None, :] < torch.tensor([t, t * 3 // 4, t // 2, t // 4][:b] + [t] * max(0, b - 4))[:, None]

    print(f"VGS loss demo: B={b} T={t} V={v} H_student={hs} H_teacher={ht}, "
          f"{int(mask.sum())} valid tokens, fp32, {torch.get_num_threads()} threads")
    out = fused_linear_vgs_loss(student[0], student[1], ws, teacher[0], teacher[1], wt, mask)
    print("metrics: " + ", ".join(f"{k}={val:.4f}" for k, val in out.metrics.items()))
    print(f"loss={out.loss.item():.5f}\n")

    available = [k for k, s in backends().items() if is_available(s) and k != "cuda"]
    print(f"{'backend':<10} {'fwd+bwd (s)':>12} {'largest tensor (MiB)':>22} {'loss':>10}")
    for name in available:
        if name == "triton":
            continue  # CPU tensors run Triton only in its (slow) interpreter
        times, largest, loss = [], 0, 0.0
        for _ in range(args.repeats):
            for p in (*student, ws):
                p.grad = None

            def step(name=name):
                nonlocal loss
                o = fused_linear_vgs_loss(student[0], student[1], ws, teacher[0], teacher[1], wt, mask, backend=name)
                o.loss.backward()
                loss = o.loss.item()

            dt, big = _largest_allocation(step)
            times.append(dt)
            largest = max(largest, big)
        times.sort()
        print(f"{name:<10} {times[len(times) // 2]:>12.3f} {largest / 2**20:>22.1f} {loss:>10.5f}")
    skipped = {k: s for k, s in backends().items() if not is_available(s)}
    if skipped:
        print("\nnot available here: " + "; ".join(f"{k}: {s}" for k, s in skipped.items()))


if __name__ == "__main__":
    main()
