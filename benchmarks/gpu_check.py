"""One command on a GPU machine: ``make gpu-check`` (``python -m benchmarks.gpu_check``).

For one H100/H200-class GPU with torch (CUDA build), triton and nvcc already installed; no network is
used. Within ``--budget`` seconds (480 by default), each step with its own time limit, in order:

1. ``env``: torch / CUDA / GPU, triton, nvcc, and which optional packages are here (pytest,
   liger-kernel, transformers); a step that needs a missing one is skipped, and says so.
2. ``build``: ``vgs_kernels._C`` built in place against this torch (``VGS_BUILD_EXT=1``, this GPU's
   architecture only).
3. ``tests``: the kernel tests with compiled Triton (``VGS_TRITON_TEST_DEVICE=cuda``), CUDA cases
   (torch, triton, cuda backends): backend grids, row contract, fp16 at 4096 rows, predicted gate,
   frozen inputs, triton kernel tests.
4. ``row_kernels``: the row kernels alone at a Qwen chunk ([1664, 151936] bf16, the pass-1 call):
   Triton configs swept, the CUDA kernel; bytes moved per second (the model's HBM constant).
5. ``kernels``: ``benchmarks.kernels`` at B*T 4096 and 16384 (Qwen3-VL shapes, bf16): vgs / std on
   triton and cuda, Liger's chunked and Triton fused linear JSD (beta = 1) when installed, the
   measured GEMM floors.
6. ``model``: ``benchmarks.gpu_model`` again with the measured GEMM rate and bandwidth.
7. ``step``: ``benchmarks.step`` (2B/8B-sized Qwen3-VL, random weights, no rollout) if time is left
   and transformers is installed.
8. ``report``: the README benchmark section regenerated.

Writes ``benchmarks/results/gpu_check-<gpu>.json`` (each step's status, time and output tail, the
row-kernel sweep, the calibration) next to the files the benchmarks write.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import common as C

PY = sys.executable
LIMITS = {"build": 150, "tests": 170, "row_kernels": 45, "kernels": 150, "model": 30, "step": 240, "report": 20}
KERNEL_TESTS = ["tests/kernels/test_row_contract.py", "tests/kernels/test_loss_backends.py",
                "tests/kernels/test_frozen_inputs.py", "tests/kernels/test_fp16_scale.py",
                "tests/kernels/test_predicted_gate.py", "tests/kernels/test_triton.py", "tests/kernels/test_driver.py"]
TRITON_CONFIGS = [(1024, 8), (1024, 4), (2048, 8), (2048, 16), (512, 4)]


class Steps:
    def __init__(self, budget: float):
        self.t0 = time.monotonic()
        self.budget = budget
        self.records: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list[str], env: dict | None = None, min_left: float = 10.0) -> dict:
        limit = min(LIMITS.get(name, 60), self.left() - 5)
        rec = {"step": name, "command": " ".join(cmd)}
        if limit < min_left:
            rec.update(status="skipped", reason=f"out of time ({self.left():.0f} s left of {self.budget:.0f})")
            return self._done(rec)
        print(f"\n## {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, timeout=limit)
            out = proc.stdout + proc.stderr
            rec.update(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            rec.update(status="timeout", limit_s=limit)
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["output_tail"] = out[-4000:]
        print(out[-2500:], flush=True)
        return self._done(rec)

    def skip(self, name: str, reason: str) -> dict:
        return self._done({"step": name, "status": "skipped", "reason": reason})

    def _done(self, rec: dict) -> dict:
        self.records.append(rec)
        print(f"## {rec['step']}: {rec['status']}" + (f" ({rec.get('reason')})" if rec.get("reason") else "")
              + (f" in {rec['seconds']} s" if "seconds" in rec else ""), flush=True)
        return rec


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "nvcc": shutil.which("nvcc"), "python": sys.version.split()[0]}
    for mod in ("triton", "pytest", "liger_kernel", "transformers", "setuptools", "ninja"):
        env[mod] = importlib.util.find_spec(mod) is not None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory)
    return env


# ----------------------------------------------------------------------------- row-kernel sweep (subprocess)
def row_kernels(out_path: str, rows: int, vocab: int, vocab_size: int) -> None:
    """Times the pass-1 row-kernel call (grad_zs and grad_zsp in place) per backend / Triton config."""
    import torch

    from vgs_kernels.backends import resolve, triton_rows

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    base = [torch.randn(rows, vocab, generator=g, device=dev).mul_(3).to(torch.bfloat16) for _ in range(4)]
    work = [b.clone() for b in base]
    coef = torch.rand(rows, 3, device=dev) / rows
    item = 2
    # pass A reads 4 streams, pass B reads 4 again and writes 2 gradients (the analytic model's count)
    moved = rows * vocab_size * item * 8 + rows * vocab * item * 2
    results = []

    def bench(label, fn, config=None):
        triton_rows.CONFIG_OVERRIDE = config
        times = []
        for i in range(6):
            for w, b in zip(work, base):
                w.copy_(b)
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            if i:  # the first run compiles / warms up
                times.append(time.perf_counter() - t)
        ms = 1e3 * statistics.median(times)
        results.append({"kernel": label, "config": config, "median_ms": ms, "gb_per_s": moved / ms / 1e6,
                        "n": len(times)})
        print(f"  {label:32s} {ms:8.3f} ms  {moved / ms / 1e6:8.0f} GB/s", flush=True)

    for name in ("triton", "cuda"):
        try:
            fn = resolve(name, dev).rows_fn
        except ValueError as exc:
            results.append({"kernel": name, "status": "unavailable", "reason": str(exc)[:300]})
            continue

        def call(fn=fn):
            fn(*work, coef, temperature=1.0, detach_target_prior=True, grad_zs=work[0], grad_zsp=work[1],
               vocab=vocab_size)

        for config in TRITON_CONFIGS if name == "triton" else [None]:
            try:
                bench(f"{name}" + (f" BLOCK_V={config[0]} warps={config[1]}" if config else ""), call, config)
            except Exception as exc:  # noqa: BLE001 -- a config that does not compile is a result
                results.append({"kernel": name, "config": config, "status": "error", "error": str(exc)[:300]})
        triton_rows.CONFIG_OVERRIDE = None
    Path(out_path).write_text(json.dumps({"rows": rows, "vocab": vocab, "vocab_size": vocab_size,
                                          "bytes_moved": moved, "results": results}, indent=1))


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    p.add_argument("--skip", nargs="+", default=[], help="steps to skip")
    p.add_argument("--row-kernels", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row_kernels:
        row_kernels(args.row_kernels, rows=1664, vocab=151936, vocab_size=151669)
        return 0

    steps = Steps(args.budget)
    env_info = environment()
    print("# gpu-check environment: " + json.dumps(env_info), flush=True)
    if not env_info["cuda_available"]:
        print("gpu-check needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    slug = C.slug(env_info.get("gpu", "cuda"))
    base_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    base_env.pop("TRITON_INTERPRET", None)

    def want(name):
        if name in args.skip:
            steps.skip(name, "--skip")
            return False
        return True

    if want("build"):
        cap = env_info["capability"]
        env = dict(base_env, VGS_BUILD_EXT="1", TORCH_CUDA_ARCH_LIST=cap, MAX_JOBS=str(os.cpu_count() or 4))
        steps.run("build", [PY, "setup.py", "-q", "build_ext", "--inplace"], env=env)
    if want("tests"):
        if env_info["pytest"]:
            env = dict(base_env, VGS_TRITON_TEST_DEVICE="cuda")
            steps.run("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or triton",
                                *KERNEL_TESTS], env=env)
        else:
            steps.skip("tests", "pytest is not installed")
    rows_json = C.RESULTS_DIR / f"gpu_check-rows-{slug}.json"
    if want("row_kernels"):
        steps.run("row_kernels", [PY, "-m", "benchmarks.gpu_check", "--row-kernels", str(rows_json)], env=base_env)
    kernels_json = C.RESULTS_DIR / f"kernels-{slug}.json"
    if want("kernels"):
        steps.run("kernels", [PY, "-m", "benchmarks.kernels", "--device", "cuda", "--bts", "4096", "16384",
                              "--cases", "vgs:triton", "vgs:cuda", "std:", "liger", "gemm_floor",
                              "--repeats", "5", "--min-repeats", "3", "--budget", "10", "--no-plots",
                              "--note", "make gpu-check"], env=base_env)
    calibration = _calibration(rows_json, kernels_json)
    if want("model") and calibration:
        cmd = [PY, "-m", "benchmarks.gpu_model", "--name", f"gpu_model-calibrated-{slug}", "--rows", "4096", "16384"]
        if "gemm_tflops" in calibration:
            cmd += ["--gemm-tflops", f"{calibration['gemm_tflops']:.1f}"]
        if "hbm_tbps" in calibration:
            cmd += ["--hbm-tbps", f"{calibration['hbm_tbps']:.3f}"]
        steps.run("model", cmd, env=base_env)
    if want("step"):
        if not env_info["transformers"]:
            steps.skip("step", "transformers is not installed")
        else:
            steps.run("step", [PY, "-m", "benchmarks.step", "--device", "cuda", "--batch", "8", "--response", "256",
                               "--repeats", "3", "--no-rollout", "--no-plots", "--note", "make gpu-check"],
                      env=base_env, min_left=120)
    doc = {"benchmark": "gpu_check", "schema_version": 1,
           "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": env_info,
           "versions": C.versions(), "budget_s": args.budget, "steps": steps.records,
           "row_kernels": json.loads(rows_json.read_text()) if rows_json.exists() else None,
           "calibration": calibration, "comparison": _compare(kernels_json, slug)}
    path = C.write_json(C.RESULTS_DIR / f"gpu_check-{slug}.json", doc)
    if want("report"):
        steps.run("report", [PY, "-m", "benchmarks.report", "--readme", "README.md"], env=base_env, min_left=3)
        doc["steps"] = steps.records
        C.write_json(path, doc)
    print(f"\nwrote {path}; {time.monotonic() - steps.t0:.0f} s of {args.budget:.0f}", flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in steps.records) else 1


def _calibration(rows_json: Path, kernels_json: Path) -> dict:
    """The model's constants as measured here: the best row-kernel bandwidth, the GEMM floor's rate."""
    out: dict = {}
    if rows_json.exists():
        best = [r["gb_per_s"] for r in json.loads(rows_json.read_text())["results"] if "gb_per_s" in r]
        if best:
            out["hbm_tbps"] = max(best) / 1e3
    if kernels_json.exists():
        doc = json.loads(kernels_json.read_text())
        rates = [r["tflops_per_s"] for r in doc.get("results", [])
                 if r.get("case") == "gemm_floor:vgs" and r.get("status") == "ok" and r.get("tflops_per_s")]
        if rates:
            out["gemm_tflops"] = max(rates)
    return out


def _compare(kernels_json: Path, slug: str) -> list[dict]:
    """Measured fused-loss times against the calibrated model's."""
    model_json = C.RESULTS_DIR / f"gpu_model-calibrated-{slug}.json"
    if not (kernels_json.exists() and model_json.exists()):
        return []
    measured = {(r["bt"], r["case"]): r for r in json.loads(kernels_json.read_text()).get("results", [])
                if r.get("status") == "ok"}
    rows = []
    for c in json.loads(model_json.read_text()).get("cases", []):
        case = {"vgs": "vgs:triton", "standard": "std:triton", "liger_jsd": "liger:chunked"}[c["name"]]
        m = measured.get((c["rows"], case))
        if m:
            rows.append({"case": case, "rows": c["rows"], "measured_ms": 1e3 * m["median_s"],
                         "modelled_ms": c["modelled_ms"], "measured_over_modelled": 1e3 * m["median_s"] / c["modelled_ms"],
                         "measured_peak_bytes": m.get("peak_bytes"), "modelled_peak_bytes": c["peak_temp_bytes"]})
    return rows


if __name__ == "__main__":
    sys.exit(main())
