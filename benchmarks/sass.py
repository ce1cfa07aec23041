"""The Triton row kernel compiled for a GPU without one: registers, stack / spills and SASS instructions.

    python -m benchmarks.sass                       # the configs the driver picks and the sweep, sm_90
    python -m benchmarks.sass --arch 80 --config 1024,8

Compiles ``vgs_kernels.backends.triton_rows._vgs_rows_kernel`` with Triton's own compiler API (``ASTSource``
+ ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``; ptxas is the one Triton ships), with the
specialisations Triton's JIT applies to the launch the driver makes (16-byte aligned pointers, strides and
row lengths divisible by 16 at V = 151936, ``V_FULL`` a multiple of the tile), then reads the cubin with
the ``cuobjdump`` Triton ships: ``-res-usage`` for registers, stack and local (spill) bytes, ``-sass`` for
the instructions. The loops of the kernel are found in the SASS (backward branches); the first is pass A's
loop over the unmasked blocks, the one after the reductions pass B's: their instructions per iteration,
divided by the entries a thread handles per iteration (``PER_THREAD``), are the instructions a
thread issues per logit (``instr_per_logit``), what the cost model's issue term uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# the launches the driver makes: pass 1 (both gradient buffers, bf16 logits), the text-only pair alone
# (the correction pass), statistics only
LAUNCHES = {
    "pass1": dict(HAS_GS=True, HAS_GSP=True, PRIOR_GRAD=False, TWO_STREAMS=False),
    "stats": dict(HAS_GS=False, HAS_GSP=False, PRIOR_GRAD=False, TWO_STREAMS=False),
    "two_streams": dict(HAS_GS=True, HAS_GSP=False, PRIOR_GRAD=False, TWO_STREAMS=True),
    "prior_grad": dict(HAS_GS=True, HAS_GSP=True, PRIOR_GRAD=True, TWO_STREAMS=False),
}
QWEN_VOCAB = 151936
REG_LIMIT = 128  # registers per thread the kernel must fit (two 8-warp blocks per SM on sm_90 need <= 128)


@dataclass
class Compiled:
    launch: str
    dtype: str
    block_v: int
    per_thread: int
    warps: int
    arch: int
    triton: str
    registers: int
    stack_bytes: int  # the stack frame per thread: where ptxas puts spilled registers
    local_bytes: int
    sass_instructions: int
    loops: list  # instructions per iteration of each loop, in program order
    pass_a_instr_per_logit: float
    pass_b_instr_per_logit: float | None
    pass_a_mufu_per_logit: float


def tool(name: str) -> str:
    """A binary Triton ships (ptxas, cuobjdump, nvdisasm)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not shipped with this triton ({triton.__version__}): {path}")
    return path


def compile_kernel(launch: str = "pass1", per_thread: int | None = None, warps: int | None = None,
                   dtype: str = "bf16", arch: int = 90, vocab: int = QWEN_VOCAB):
    """(Triton's CompiledKernel, tile entries, warps) for one launch configuration (default: the driver's)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vgs_kernels.backends import triton_rows as tr

    if per_thread is None or warps is None:
        _, per_thread, warps = tr.cuda_config(vocab)
    threads = 32 * warps
    kernel = tr._vgs_rows_kernel
    names = list(kernel.arg_names)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in ("zs_ptr", "zsp_ptr", "zt_ptr", "ztp_ptr", "gs_ptr", "gsp_ptr"):
            sig[n] = "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n.endswith("_ptr"):
            sig[n] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n.startswith("stride") or n in ("V", "V_FULL", "WIDTH"):
            sig[n] = "i64" if n.startswith("stride") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # 151936 = 16 * 9496; V_FULL a multiple of BLOCK_V
        elif n == "inv_tau":
            sig[n] = "fp32"
        else:
            sig[n] = "constexpr"
    const = dict(LAUNCHES[launch], THREADS=threads, PER_THREAD=per_thread, TILE=threads * per_thread)
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return ck, threads * per_thread, warps


def _resources(cubin: str) -> dict:
    out = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "local_bytes": int(m.group(4))}


def _sass(cubin: str) -> list[str]:
    out = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


_INSTR = re.compile(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH = re.compile(r"^\s*(0x[0-9a-f]+)")


def loops(lines: list[str]) -> tuple[list[dict], int]:
    """Loops of a ``cuobjdump -sass`` listing (addresses in ``/*0a20*/``, branches to absolute addresses):
    for each backward branch, the instructions from its target to it; and the listing's instruction count."""
    instrs = []  # (address, opcode, operands)
    for ln in lines:
        m = _INSTR.search(ln)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2), m.group(3)))
    found = []
    for addr, op, operands in instrs:
        t = _BRANCH.match(operands) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < addr:
            body = [o for a, o, _ in instrs if int(t.group(1), 16) <= a <= addr]
            found.append({"start": int(t.group(1), 16), "instructions": len(body),
                          "mufu": sum(o.startswith("MUFU") for o in body),
                          "loads": sum(o.startswith(("LDG", "LD.")) for o in body)})
    return found, len(instrs)


def inspect(launch: str = "pass1", per_thread: int | None = None, warps: int | None = None, dtype: str = "bf16",
            arch: int = 90) -> Compiled:
    """Compile one configuration (``per_thread`` entries per thread, ``warps``) and read its resources and
    loops."""
    import triton

    ck, block_v, warps = compile_kernel(launch, per_thread, warps, dtype, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        res = _resources(cubin)
        found, n_instr = loops(_sass(cubin))
    per_thread = block_v // (32 * warps)
    body = [lp for lp in found if lp["instructions"] > 8]  # the vocabulary loops (not tiny copy loops)
    grads = LAUNCHES[launch]["HAS_GS"] or LAUNCHES[launch]["HAS_GSP"]
    a = body[0] if body else None
    b = body[1] if grads and len(body) > 1 else None
    return Compiled(launch=launch, dtype=dtype, block_v=block_v, per_thread=per_thread, warps=warps, arch=arch,
                    triton=triton.__version__, registers=res["registers"], stack_bytes=res["stack_bytes"],
                    local_bytes=res["local_bytes"], sass_instructions=n_instr,
                    loops=[lp["instructions"] for lp in found],
                    pass_a_instr_per_logit=a["instructions"] / per_thread if a else float("nan"),
                    pass_b_instr_per_logit=b["instructions"] / per_thread if b else None,
                    pass_a_mufu_per_logit=a["mufu"] / per_thread if a else float("nan"))


SWEEP = [(8, 8), (8, 4), (4, 8), (16, 4), (8, 16)]  # (entries per thread, warps)


def check_set() -> list[tuple[str, str, tuple[int, int] | None]]:
    """(launch, dtype, config) the kernel must fit: the driver's config for every launch in bf16 and for
    pass 1 in fp16 / fp32, and every config the benchmarks sweep (pass 1, bf16)."""
    out = [(launch, "bf16", None) for launch in LAUNCHES]
    out += [("pass1", dt, None) for dt in ("fp16", "fp32")]
    return out + [("pass1", "bf16", cfg) for cfg in SWEEP]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--config", action="append", help="PER_THREAD,warps (repeatable; default: the driver's and the "
                   "sweep)")
    p.add_argument("--launch", action="append", choices=sorted(LAUNCHES), help="default: all")
    p.add_argument("--check", action="store_true", help=f"the configurations the kernel must fit (check_set); exit "
                   f"1 when one needs more than {REG_LIMIT} registers or any stack / local bytes")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.check:
        todo = [(launch, dt, cfg) for launch, dt, cfg in check_set()]
    else:
        configs = [tuple(int(x) for x in c.split(",")) for c in args.config] if args.config else [None] + SWEEP
        todo = [(launch, args.dtype, cfg) for launch in args.launch or list(LAUNCHES) for cfg in configs]
    rows, bad = [], []
    for launch, dtype, cfg in todo:
        c = inspect(launch, *(cfg or (None, None)), dtype=dtype, arch=args.arch)
        rows.append(asdict(c))
        over = c.registers > REG_LIMIT or c.stack_bytes or c.local_bytes
        bad += [c] if over else []
        print(f"{launch:12s} {c.dtype} tile={c.block_v:5d} ({c.per_thread} x {32 * c.warps} threads) sm_{c.arch}: "
              f"regs {c.registers:3d} stack {c.stack_bytes:3d} B local {c.local_bytes:3d} B; pass A "
              f"{c.pass_a_instr_per_logit:5.1f} instr/logit ({c.pass_a_mufu_per_logit:.2f} MUFU), pass B "
              f"{'-' if c.pass_b_instr_per_logit is None else f'{c.pass_b_instr_per_logit:.1f}'}"
              + ("   <-- OVER" if over else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check and bad:
        print(f"{len(bad)} configuration(s) over {REG_LIMIT} registers or with stack / local bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
