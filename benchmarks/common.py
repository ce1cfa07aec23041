"""Shared helpers of the benchmarks: devices, versions, timing, peak memory, JSON and tables.

Timing: wall clock (``time.perf_counter``) around each call, with ``torch.cuda.synchronize`` before
and after on CUDA; we report the median of the repeated runs (after warm-up runs that are not
counted).

Peak memory, what it measures:

* CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus ``memory_allocated()`` before it
  (peak stats reset first): bytes the call held at its worst moment on top of its inputs, through
  PyTorch's caching allocator (the allocator's reserved-but-free cache is not counted).
* CPU: the PyTorch profiler's allocator events (``profile_memory=True``): every allocation and free
  made through c10's CPU allocator (all ATen tensors, including those a C++ extension allocates with
  ATen) on the calling thread, summed in time order; the peak of that running sum is the bytes held
  on top of what was live before the call. Events are kept only when their thread id is the one of
  a marker ``record_function`` opened around the call on the calling thread (the profiler reports
  allocations only from threads that carry its thread-local state; any from other threads are
  counted in ``other_thread_memory_events`` and left out of the peak). Allocations made with raw
  ``malloc``/``new`` inside a C++ extension are not seen. The process's resident set is not used:
  measured around the profiler it would include the profiler's own event buffers.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- devices & versions
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return dev


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    """The machine the numbers come from: name, a file-name slug, and details."""
    info: dict = {"type": device.type, "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    total_memory_bytes=props.total_memory)
        info["slug"] = slug(props.name)
    else:
        info["name"] = f"CPU ({info['cpu_model']}, {info['cpu_count']} cores)"
        info["slug"] = "cpu"
    # the code paths in use: ATen's vectorised kernels (AVX512 / AVX2 / DEFAULT) and our CPU row kernel's variant
    info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        from vgs_kernels.backends import extension

        info["vgs_cpu_kernel"] = extension.CPU_ISA
    except ImportError:
        info["vgs_cpu_kernel"] = None
    info["isa_env"] = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                                                  "VGS_CPU_ISA") if k in os.environ}
    info["mem_total_bytes"] = meminfo("MemTotal")
    return info


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001 -- any import failure means "not usable here"
        return None


def _pkg_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _pkg_version("liger_kernel") or _pkg_version("liger-kernel"),
        "transformers": _pkg_version("transformers"),
        "vgs_kernels": _version("vgs_kernels"),
        "git_commit": git_commit(),
    }


def machine_state() -> dict:
    """Load average and free memory, recorded because a shared machine makes timings noisy."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"loadavg_1_5_15": load, "cpu_count": os.cpu_count(),
            "mem_available_bytes": meminfo("MemAvailable")}


def meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def header(device: torch.device, args, kind: str) -> dict:
    """The common top of every results JSON."""
    return {
        "benchmark": kind,
        "schema_version": 1,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": bool(getattr(args, "quick", False)),
        "command": " ".join([os.path.basename(sys.executable), "-m", f"benchmarks.{kind}", *sys.argv[1:]]),
        "device": device_info(device),
        "versions": versions(),
        "machine_state_start": machine_state(),
        "notes": list(getattr(args, "note", None) or []) + shared_machine_note(),
    }


def shared_machine_note() -> list[str]:
    """A note when other work was running: load average above half the CPUs at the start."""
    st = machine_state()
    la, n = st["loadavg_1_5_15"], st["cpu_count"] or 1
    if la and la[0] > 0.5 * n:
        return [f"machine shared with other work: 1-min load average {la[0]:.1f} on {n} CPUs at the start; "
                "timings are noisy"]
    return []


# ----------------------------------------------------------------------------- standard-OPD baseline
# how the standard-OPD baseline is called, for the results JSON
STANDARD_TEXT_STREAMS = "None (mode='standard' without text-only streams: their lm_head GEMMs are skipped)"


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], setup: Callable[[], None] | None, device: torch.device, *,
            warmup: int = 1, repeats: int = 5, min_repeats: int = 3, budget_s: float = 30.0) -> dict:
    """Run ``setup(); fn()`` warmup times, then time ``fn`` alone ``repeats`` times (fewer, but at
    least ``min_repeats``, once ``budget_s`` seconds of timed runs have passed)."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
        sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and not (len(times) >= min_repeats and spent > budget_s):
        if setup:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times, "n": len(times)}


# ----------------------------------------------------------------------------- memory
CPU_MEMORY_METHOD = ("torch.profiler allocator events (c10 CPU allocator), filtered to the calling thread, "
                     "peak of the running sum of allocations minus frees during the call")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it"


def peak_memory(fn: Callable[[], None], setup: Callable[[], None] | None, device: torch.device) -> dict:
    """Peak bytes held by one call of ``fn`` on top of what was live before it (see module doc)."""
    if setup:
        setup()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"peak_bytes": int(peak), "method": "cuda.max_memory_allocated"}

    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(_MARKER):
            fn()
    events = list(prof.profiler.kineto_results.events())
    tids = {e.start_thread_id() for e in events if e.name() == _MARKER}
    if len(tids) != 1:
        raise RuntimeError(f"peak_memory: expected one {_MARKER!r} profiler event, found thread ids {tids}")
    tid = tids.pop()
    mem = [e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    other = sum(1 for e in mem if e.start_thread_id() != tid)
    mem = sorted((e for e in mem if e.start_thread_id() == tid), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in mem:
        cur += e.nbytes()
        peak = max(peak, cur)
    out = {"peak_bytes": int(peak), "method": "profiler.cpu_allocator"}
    if other:
        out["other_thread_memory_events"] = other
    return out


_MARKER = "benchmarks.peak_memory.call"


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


@contextlib.contextmanager
def frozen_heap():
    """Within the block, ``gc.collect()`` (before every memory run and between cases) scans only what the
    benchmark allocates: the objects alive on entry -- millions after importing torch._dynamo, Triton and
    Liger, 0.4 s per full collection -- move to gc's permanent generation until the block ends."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- output
def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, sort_keys=False, default=_json_default, allow_nan=False)
    path.write_text(text + "\n")
    return path


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def repeats_of(rec: dict | None) -> int | None:
    """Timed runs behind a result: its ``n``, else the length of its ``times_s`` / ``samples``
    (result files written before ``n`` was recorded), else None (unknown)."""
    if not rec:
        return None
    if isinstance(rec.get("n"), int):
        return rec["n"]
    for key in ("times_s", "samples"):
        if isinstance(rec.get(key), list):
            return len(rec[key])
    return None


def n_str(n: int | None) -> str:
    """A repeat count for a table cell: the number, or ``?`` when a result file does not say."""
    return "?" if n is None else str(n)


def fmt_n(n: int | None) -> str:
    return f"n={n_str(n)}"


def fmt_time_n(s: float | None, n: int | None) -> str:
    """A median time with the number of timed runs behind it: ``1.51 s (n=5)`` (``n=?`` if unknown)."""
    return "-" if s is None else f"{fmt_time(s)} ({fmt_n(n)})"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def save_plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]],
              logy: bool = True) -> Path | None:
    """One line per series (x, y); points with y None are dropped. Returns None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    if not any(y is not None for _, ys in series.values() for y in ys):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
