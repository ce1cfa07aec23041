"""One command on a GPU machine: ``make gpu-check`` (``python -m benchmarks.gpu_check``). It exits non-zero
when anything is wrong, so that one run tells the truth.

For one H100/H200-class GPU with torch (CUDA build), triton, pytest and nvcc installed; no network. Steps,
each in a subprocess under its own time limit; the limits add up to the budget (480 s by default), the
checks first, the measurements as time allows:

==============  =====  ========  ======================================================================
step            limit  required  what
==============  =====  ========  ======================================================================
``env``             -  yes       torch sees a CUDA device; triton, pytest, nvcc present (missing: fails)
``build``         110  yes       ``vgs_kernels._C`` for this GPU (CUDA_HOME from the real nvcc if unset,
                                 ``vgs_kernels/_cuda_home.py``)
``numerics``      100  yes       ``benchmarks.gpu_numerics``: row kernels with poisoned buffers, the fused
                                 loss of every GPU backend and mode at B*T 4096, H 2048 / 4096, V 151936,
                                 bf16 against an fp32 reference on the GPU; the in-place fp32 weight-
                                 gradient GEMM (never the slab fallback on torch >= 2.10)
``tests``          80  yes       the kernel tests on CUDA (compiled Triton, the cuda backend)
``microbench``     25  no        GEMM rates at the loss's shapes and copy bandwidth: the cost model's
                                 calibration (never the modelled kernels themselves)
``row_kernels``    25  no        the row kernels alone at a Qwen chunk, Triton tiles swept
``kernels``        80  no        ``benchmarks.kernels`` at B*T 4096 and 16384 (``--strict``: an error, OOM
                                 or missed target fails it)
``model``          20  no        ``benchmarks.gpu_model`` with the microbenchmarks' constants
``verl``           20  no        the verl recipe's loss function on CUDA tensors (skipped without verl)
``report``         10  no        a markdown summary
==============  =====  ========  ======================================================================

A required step that fails, times out or cannot run fails the check; so does an optional step that ran
and failed (a step skipped for lack of time is reported, not failed). Results go to ``--out`` (default:
``$OUT/gpu-check`` when ``$OUT`` is set, else ``benchmarks/results/gpu-check``): ``summary.json`` (each step's
status, time, command and output tail, the environment) and every step's own JSON.

``--device cpu --small`` runs the same steps on the CPU backends at small sizes, and ``--inject`` plants a
failure (``missing_package``, ``exception``, ``wrong_number``, ``slab_fallback``): how the tests check that
each failure gives a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import common as C

PY = sys.executable
# (step, limit in seconds, required)
STEPS = [("build", 110, True), ("numerics", 100, True), ("tests", 80, True), ("microbench", 25, False),
         ("row_kernels", 25, False), ("kernels", 80, False), ("model", 20, False), ("verl", 20, False),
         ("report", 10, False)]
KERNEL_TESTS = ["tests/kernels/test_row_contract.py", "tests/kernels/test_loss_backends.py",
                "tests/kernels/test_frozen_inputs.py", "tests/kernels/test_fp16_scale.py",
                "tests/kernels/test_predicted_gate.py", "tests/kernels/test_triton.py", "tests/kernels/test_gemm.py"]
REQUIRED_MODULES = ("torch", "triton", "pytest")
INJECTIONS = ("missing_package", "exception", "wrong_number", "slab_fallback")


class Steps:
    """Runs the steps in order within the budget and records each."""

    def __init__(self, budget: float, out: Path):
        self.t0 = time.monotonic()
        self.budget = budget
        self.out = out
        self.records: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, name: str, limit: float, required: bool, cmd: list[str], env: dict) -> dict:
        rec = {"step": name, "required": required, "command": " ".join(cmd), "limit_s": limit}
        limit = min(limit, self.left() - 2)
        if limit < 5:
            return self._done(rec | {"status": "failed" if required else "skipped",
                                     "reason": f"out of time ({self.left():.0f} s left of {self.budget:.0f})"})
        print(f"\n## {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, timeout=limit)
            out = proc.stdout + proc.stderr
            rec.update(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode)
        except subprocess.TimeoutExpired as exc:
            out = _text(exc.stdout) + _text(exc.stderr)
            rec.update(status="timeout", reason=f"killed after {limit:.0f} s")
        rec["seconds"] = round(time.monotonic() - t0, 1)
        rec["output_tail"] = out[-4000:]
        (self.out / f"{name}.log").write_text(out)
        print(out[-2500:], flush=True)
        return self._done(rec)

    def record(self, name: str, required: bool, status: str, reason: str = "", **extra) -> dict:
        return self._done({"step": name, "required": required, "status": status, "reason": reason, **extra})

    def _done(self, rec: dict) -> dict:
        self.records.append(rec)
        print(f"## {rec['step']}: {rec['status'].upper()}" + (f" ({rec['reason']})" if rec.get("reason") else "")
              + (f" in {rec['seconds']} s" if "seconds" in rec else ""), flush=True)
        return rec

    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] not in ("ok", "skipped")
                or (r["status"] == "skipped" and r["required"])]


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def environment(inject: str | None) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "python": sys.version.split()[0], "nvcc": shutil.which("nvcc"), "CUDA_HOME": os.environ.get("CUDA_HOME")}
    for mod in (*REQUIRED_MODULES, "liger_kernel", "transformers", "verl"):
        env[mod] = importlib.util.find_spec(mod) is not None
    if inject == "missing_package":
        env["pytest"] = False
    if env["triton"]:
        import triton

        env["triton_version"] = triton.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory,
                   sms=p.multi_processor_count)
    return env


def default_out() -> Path:
    base = os.environ.get("OUT")
    return Path(base) / "gpu-check" if base else C.RESULTS_DIR / "gpu-check"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    p.add_argument("--out", type=Path, help="results folder (default: $OUT/gpu-check or benchmarks/results/gpu-check)")
    p.add_argument("--only", nargs="+", help="run only these steps (env always runs)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the CPU backends (tests)")
    p.add_argument("--small", action="store_true", help="small sizes (with --device cpu)")
    p.add_argument("--inject", choices=INJECTIONS, help="plant a failure (tests of this script)")
    args = p.parse_args(argv)
    out = (args.out or default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.budget, out)
    info = environment(args.inject)
    print("# gpu-check environment: " + json.dumps(info), flush=True)
    cpu = args.device == "cpu"
    missing = [m for m in REQUIRED_MODULES if not info[m]] + ([] if cpu or info["nvcc"] else ["nvcc"])
    if not cpu and not info["cuda_available"]:
        missing.append("a CUDA device (torch.cuda.is_available() is False)")
    steps.record("env", True, "failed" if missing else "ok", f"missing: {', '.join(missing)}" if missing else "")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    if not cpu and not env.get("CUDA_HOME"):  # setup.py derives the same; said here for the record
        from vgs_kernels._cuda_home import cuda_home_from_nvcc

        home = cuda_home_from_nvcc()
        if home:
            env["CUDA_HOME"] = info["CUDA_HOME"] = home
    wanted = [s for s in STEPS if not args.only or s[0] in args.only]
    if not missing:
        for name, limit, required in wanted:
            cmd, reason = command(name, args, out, info)
            if cmd is None:
                steps.record(name, required, "failed" if required else "skipped", reason)
            else:
                steps.run(name, limit, required, cmd, env)
    summary = {"benchmark": "gpu_check", "schema_version": 2, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime()),
               "device": args.device, "environment": info, "versions": C.versions(), "budget_s": args.budget,
               "seconds": round(time.monotonic() - steps.t0, 1), "steps": steps.records,
               "failed": [r["step"] for r in steps.failed()], "inject": args.inject}
    summary["passed"] = not summary["failed"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n# gpu-check: {'PASSED' if summary['passed'] else 'FAILED: ' + ', '.join(summary['failed'])} in "
          f"{summary['seconds']:.0f} s of {args.budget:.0f}; {out / 'summary.json'}", flush=True)
    for r in steps.records:
        print(f"#   {r['step']:12s} {r['status']:8s} {r.get('seconds', '')!s:>6s}  {r.get('reason', '')}", flush=True)
    return 0 if summary["passed"] else 1


def command(name: str, args, out: Path, info: dict) -> tuple[list[str] | None, str]:
    """The step's command line, or (None, why it cannot run)."""
    cpu = args.device == "cpu"
    small = ["--small"] if args.small else []
    if name == "build":
        if cpu:
            return [PY, "setup.py", "-q", "build_ext", "--inplace"], ""
        return [PY, "-c", "import os, subprocess, sys; os.environ['VGS_BUILD_EXT'] = '1'; "
                f"os.environ['TORCH_CUDA_ARCH_LIST'] = '{info.get('capability', '')}'; "
                "os.environ.setdefault('MAX_JOBS', str(os.cpu_count() or 4)); "
                "sys.exit(subprocess.call([sys.executable, 'setup.py', '-q', 'build_ext', '--inplace']))"], ""
    if name == "numerics":
        cmd = [PY, "-m", "benchmarks.gpu_numerics", "--device", args.device, "--json", str(out / "numerics.json"),
               *small]
        return cmd + (["--inject", args.inject] if args.inject in ("exception", "wrong_number", "slab_fallback")
                      else []), ""
    if name == "tests":
        tests = KERNEL_TESTS if not cpu else ["tests/kernels/test_gemm.py"]
        return [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *(["-k", "cuda or triton"] if not cpu
                                                                           else []), *tests], ""
    if name == "microbench":
        return [PY, "-m", "benchmarks.microbench", "--device", args.device, "--json", str(out / "microbench.json"),
                *small], ""
    if name == "row_kernels":
        if cpu:
            return None, "the Triton tile sweep needs CUDA"
        return [PY, "-m", "benchmarks.row_kernels", "--json", str(out / "row_kernels.json")], ""
    if name == "kernels":
        if cpu:
            return [PY, "-m", "benchmarks.kernels", "--device", "cpu", "--quick", "--strict", "--no-plots",
                    "--cases", "vgs:cpu", "std:", "liger", "gemm_floor", "--out-dir", str(out), "--name", "kernels"], ""
        return [PY, "-m", "benchmarks.kernels", "--device", "cuda", "--bts", "4096", "16384", "--strict",
                "--cases", "vgs:triton", "vgs:cuda", "std:", "liger", "gemm_floor", "--repeats", "5",
                "--min-repeats", "3", "--budget", "5", "--no-plots", "--out-dir", str(out), "--name", "kernels",
                "--note", "make gpu-check"], ""
    if name == "model":
        calib = out / "microbench.json"
        if not calib.exists():
            return None, "no calibration: the microbench step did not write microbench.json"
        return [PY, "-m", "benchmarks.gpu_model", "--calibration", str(calib), "--out-dir", str(out),
                "--name", "gpu_model-calibrated", *(["--rows", "256", "--hs", "64", "--ht", "96", "--vocab", "1000"]
                                                    if args.small else [])], ""
    if name == "verl":
        if not info.get("verl"):
            return None, "verl is not installed"
        return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/integrations/test_verl.py",
                "tests/train/integrations/test_verl_recipe.py"], ""
    if name == "report":
        return [PY, "-m", "benchmarks.report", "--gpu-check", str(out)], ""
    raise ValueError(name)


if __name__ == "__main__":
    sys.exit(main())
