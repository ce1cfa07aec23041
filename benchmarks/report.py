"""The README's benchmark section, generated from ``benchmarks/results/*.json``.

    python -m benchmarks.report                    # print the markdown
    python -m benchmarks.report --readme README.md # replace the text between the marker lines
                                                   # <!-- benchmarks:start --> and <!-- benchmarks:end -->

For every result file (kernels, training step, cpu row kernel, gpu-check): the device it ran on, the
shapes, every B*T row of every fused backend -- those that miss a target included, marked -- and, in
every time cell, the number of timed runs behind the median (``n=?`` for files written before ``n``
was recorded). Measured results come first (GPU, then CPU), then the modelled ones
(``benchmarks.gpu_model``: no GPU involved, or one that only calibrated the constants), under their
own heading. Quick (CI-sized) result files are left out unless ``--include-quick``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import common as C

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
KINDS = ("gpu_check", "kernels", "step", "cpu_rows", "gpu_model")
MODELLED = ("gpu_model",)
MET, MISSED = "✓", "✗ missed"


def load(results_dir: Path, include_quick: bool) -> list[dict]:
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(doc, dict) or doc.get("benchmark") not in KINDS:
            continue  # not a benchmark result
        if doc.get("quick") and not include_quick:
            continue
        doc["_file"] = path.name
        doc["_dir"] = str(path.parent)
        docs.append(doc)
    return docs


def _ver(doc) -> str:
    v = doc.get("versions", {})
    parts = [f"torch {v.get('torch')}"]
    for key in ("triton", "liger_kernel", "transformers"):
        if v.get(key):
            parts.append(f"{key} {v[key]}")
    if v.get("git_commit"):
        parts.append(f"commit {v['git_commit']}")
    return ", ".join(parts)


def _machine(doc) -> str:
    dev = doc.get("device", {})
    bits = []
    if dev.get("torch_threads"):
        bits.append(f"{dev['torch_threads']} torch thread{'s' if dev['torch_threads'] != 1 else ''}")
    la = (doc.get("machine_state_start") or {}).get("loadavg_1_5_15")
    if la:
        bits.append(f"load average at start {la[0]:.1f} on {dev.get('cpu_count')} CPUs")
    return "".join(f"; {b}" for b in bits)


def _source(doc) -> str:
    return f"`benchmarks/results/{doc['_file']}`; {_ver(doc)}{_machine(doc)}"


def _heading(doc, what: str) -> str:
    return f"#### {what}: {doc.get('device', {}).get('name', '?')} ({doc.get('created_utc', '?')})"


def _notes(doc) -> list[str]:
    notes = doc.get("notes") or []
    return [f"> {n}" for n in notes] + ([""] if notes else [])


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def _standard_streams(doc) -> str:
    """How the file's standard-OPD baseline was called (files before the field: the old way)."""
    std = doc.get("standard_text_streams")
    if std:
        return f"text-only streams {std}"
    return ("written before the text-only streams of mode='standard' could be None: the baseline passed the "
            "image-conditioned streams again and ran their two lm_head GEMMs (a slower baseline, so VGS / "
            "standard ratios from this file are lower than a rerun's)")


# ----------------------------------------------------------------------------- kernels
def _mark(text: str, target: dict | None) -> str:
    """A ratio with its target status: met, missed, or nothing where the target is not binding here."""
    if text == "-" or target is None or not target.get("binding", True):
        return text
    return f"{text} {MET if target['met'] else MISSED}"


def kernels_section(doc) -> list[str]:
    sh = doc["shapes"]
    dev_type = doc["device"]["type"]
    results = doc.get("results", [])
    ok = {(r["bt"], r["case"]): r for r in results if r.get("status") == "ok"}
    allr = {(r["bt"], r["case"]): r for r in results}
    names = list(doc.get("cases") or dict.fromkeys(r["case"] for r in results))
    bts = sh["bt"]
    timing = doc.get("timing", {})
    variant = re.search(r"(\w+) variant", (doc.get("backends") or {}).get("cpu", ""))
    what = "Kernels" + (f", C++ row kernel {variant.group(1)} variant" if variant and dev_type == "cpu" else "")
    out = [_heading(doc, what), "",
           f"Fused-linear loss forward + backward, {sh['dtype']}, V = {sh['vocab']}, "
           f"H_student = {sh['hidden_student']}, H_teacher = {sh['hidden_teacher']}. Times are medians of n timed "
           f"runs, n in every cell (at least {timing.get('min_repeats', '?')}; more, up to "
           f"{timing.get('repeats', '?')}, while a case's timed runs stayed under "
           f"{timing.get('budget_s_per_case', '?')} s) ({_source(doc)}).", ""]
    out += _notes(doc)

    def status(bt, n):
        r = allr.get((bt, n))
        return r.get("status") or "-" if r else "-"

    def time_cell(bt, n):
        r = ok.get((bt, n))
        return C.fmt_time_n(r["median_s"], C.repeats_of(r)) if r else status(bt, n)

    # Every B*T of every fused backend against the targets, misses included.
    rows = {(r["bt"], r["backend"]): r for r in doc.get("ratios", {}).get("rows", [])}
    targets = {(t["target"], t["bt"], t["backend"], t.get("anchor")): t
               for t in doc.get("ratios", {}).get("targets", [])}
    fused = [n for n in names if n.startswith("vgs:") and n != "vgs:reference"]
    ligers = [n for n in names if n.startswith("liger:")]
    mem_bt = {"cuda": 8192, "cpu": 4096}.get(dev_type)
    head = ["B*T", "backend", "VGS time"]
    head += [f"`{lg}` time" for lg in ligers]
    head += [f"time / `{lg}` (≤ 2.0x)" for lg in ligers]
    head += ["GEMM floor / time (≥ 65 %" + (")" if dev_type == "cuda" else ", GPU target)"),
             "driver GEMM floor / time", "VGS peak memory"]
    head += [f"memory / `{lg}` (≤ 1.2x)" for lg in ligers]
    head += [f"reference memory / VGS (≥ 8x at B*T = {mem_bt})", "VGS / own standard"]
    head += [f"own standard / `{lg}` (≤ 1.0x)" for lg in ligers]
    tr = []
    for bt in bts:
        for case in fused:
            be = case.split(":", 1)[1]
            r = rows.get((bt, be))
            if r is None:
                tr.append([str(bt), f"`{be}`", status(bt, case), *(time_cell(bt, lg) for lg in ligers),
                           *(["-"] * (len(head) - 3 - len(ligers)))])
                continue
            cells = [str(bt), f"`{be}`", time_cell(bt, case), *(time_cell(bt, lg) for lg in ligers)]
            cells += [_mark(C.fmt_ratio(r.get(f"time_vs_{lg}")), targets.get(("vgs_time_vs_liger", bt, be, lg)))
                      for lg in ligers]
            cells += [_mark(_pct(r.get("gemm_floor_fraction")),
                            targets.get(("gemm_floor_fraction", bt, be, "gemm_floor:vgs"))),
                      _mark(_pct(r.get("gemm_floor_driver_fraction")),
                            targets.get(("gemm_floor_fraction", bt, be, "gemm_floor:vgs-driver"))),
                      C.fmt_bytes(r.get("peak_bytes"))]
            cells += [_mark(C.fmt_ratio(r.get(f"mem_vs_{lg}")), targets.get(("vgs_mem_vs_liger", bt, be, lg)))
                      for lg in ligers]
            ref_t = targets.get(("reference_mem_over_vgs", bt, be, None))
            if r.get("reference_mem_over_vgs") is not None:
                ref = _mark(C.fmt_ratio(r["reference_mem_over_vgs"]), ref_t)
            elif r.get("reference_mem_over_vgs_extrapolated") is not None:
                ref = _mark(C.fmt_ratio(r["reference_mem_over_vgs_extrapolated"]), ref_t) + \
                    f" (reference extrapolated from B*T = {r.get('reference_extrapolated_from_bt')})"
            else:
                ref = "-"
            cells += [ref, C.fmt_ratio(r.get("time_vs_own_standard"))]
            cells += [_mark(C.fmt_ratio(r.get(f"standard_time_vs_{lg}")), targets.get(("std_time_vs_liger", bt, be, lg)))
                      for lg in ligers]
            tr.append(cells)
    if tr:
        out.append(f"Against the targets ({MET} met, {MISSED}; every B*T and fused backend):")
        out.append("")
        out.append(C.table(tr, head))
        out.append("")

    thead = ["case"] + [f"B*T = {b}" for b in bts]
    out.append("Time, median of n runs, every case:")
    out.append("")
    out.append(C.table([[f"`{n}`", *(time_cell(b, n) for b in bts)] for n in names], thead))
    out.append("")
    method = "CUDA caching allocator" if dev_type == "cuda" else "CPU allocator events, torch.profiler"
    out.append(f"Peak memory above the inputs, one run per cell ({method}):")
    out.append("")

    def mem_cell(bt, n):
        r = ok.get((bt, n))
        return C.fmt_bytes(r.get("peak_bytes")) if r else status(bt, n)

    out.append(C.table([[f"`{n}`", *(mem_cell(b, n) for b in bts)] for n in names
                        if not n.startswith("gemm_floor")], thead))
    out.append("")
    if any(n.startswith("std:") for n in names):
        out.append(f"Standard-mode case (`std:*`): {_standard_streams(doc)}.")
        out.append("")
    skipped = {k: v for k, v in (doc.get("skipped") or {}).items() if "not selected" not in v}
    if skipped:
        out.append("Not run here: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + ".")
        out.append("")
    return out


# ----------------------------------------------------------------------------- step
def step_section(doc) -> list[str]:
    cfg = doc["config"]
    res = doc["results"]
    keys = ("rollout", "forwards", "loss_backward", "optimizer", "non_generation", "step")
    params = doc.get("params", {})
    size = (f" (student {params['student'] / 1e6:.2f} M, teacher {params['teacher'] / 1e6:.2f} M parameters"
            f", {cfg['dtype']})" if params else f" ({cfg['dtype']})")
    out = [_heading(doc, "Training step"), "",
           f"Preset `{doc['preset']}`{size}, batch {cfg['batch']} x {cfg['response']} response tokens, vocabulary "
           f"{cfg['vocab']}; medians of n timed steps per method, methods alternating within each repeat "
           f"({_source(doc)}).", ""]
    out += _notes(doc)
    if "opd" in res:
        out += [f"`opd` (standard OPD): {_standard_streams(doc)}.", ""]
    out.append(C.table([[f"`{m}`", *(C.fmt_time(res[m][k]) for k in keys), C.n_str(C.repeats_of(res[m]))]
                        for m in res], ["method", *keys, "n"]))
    out.append("")
    rat = doc.get("paired_ratios") or doc.get("ratios", {})
    if rat:
        names = list(rat)

        def pairs(name):
            ns = [C.repeats_of(res.get(m)) for m in name.split("_over_")]
            return None if None in ns else min(ns)

        out.append("Ratios (median over repeats of the per-repeat ratio; each repeat's methods share its rollout):")
        out.append("")
        out.append(C.table([[k, *(C.fmt_ratio(rat[n][k]) for n in names)] for k in keys] +
                           [["n (repeats)", *(C.n_str(pairs(n)) for n in names)]],
                           ["part", *(n.replace("_over_", " / ") for n in names)]))
        out.append("")
    for t in doc.get("targets", []):
        n = t.get("n")
        if n is None:
            n = C.repeats_of(res.get("vgs")) if C.repeats_of(res.get("vgs")) == C.repeats_of(res.get("opd")) else None
        out.append(f"- VGS / OPD, {t['part'].replace('_', '-')}: {t['value']:.2f}x over {C.fmt_n(n)} repeats "
                   f"(target {t['bound']}: {'met' if t['met'] else 'missed'})")
    if doc.get("targets"):
        out.append("")
    return out


# ----------------------------------------------------------------------------- cpu row kernel
def cpu_rows_section(doc) -> list[str]:
    ext = doc.get("extension", {})
    out = [_heading(doc, "CPU row kernel"), "",
           f"The compiled `cpu` row kernel ({ext.get('cpu_isa', '?')}) against the chunked `torch` backend and the "
           f"materialised `reference`, {doc.get('dtype', 'float32')} logits; medians of n timed calls "
           f"({_source(doc)}).", ""]
    out += _notes(doc)
    rows = []
    for case in doc.get("cases", []):
        for kind in ("rows", "vgs_loss"):
            table = case.get(kind) or {}
            base = (table.get("cpu") or {}).get("median_s")
            for be, r in table.items():
                t = r.get("median_s")
                n = C.repeats_of(r)
                if n is None:  # scaled from a measurement on fewer rows (files before n was copied up)
                    n = C.repeats_of(r.get("measured"))
                cell = C.fmt_time_n(t, n)
                if r.get("measured_rows"):
                    cell += f" (measured on {r['measured_rows']} rows, scaled)"
                rows.append([f"{case['N']} x {case['V']}", kind, f"`{be}`", cell, C.fmt_bytes(r.get("peak_bytes")),
                             C.fmt_ratio(t / base) if t and base else "-"])
    if rows:
        out.append(C.table(rows, ["N x V", "what", "backend", "median time", "peak memory", "time / cpu"]))
        out.append("")
    return out


# ----------------------------------------------------------------------------- gpu-check
def gpu_check_section(doc) -> list[str]:
    env = doc.get("environment", {})
    verdict = "passed" if doc.get("passed") else f"FAILED ({', '.join(doc.get('failed', []))})"
    out = [f"#### gpu-check: {env.get('gpu', '?')} ({doc.get('created_utc', '?')}): {verdict}", "",
           f"`make gpu-check` on torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton_version')}, "
           f"{_ver(doc)}; {doc.get('seconds', 0):.0f} s of a {doc.get('budget_s', 0):.0f} s budget.", ""]
    out.append(C.table([[f"`{r['step']}`", r["status"].upper() if r["status"] not in ("ok", "skipped") else r["status"],
                         "-" if "seconds" not in r else f"{r['seconds']:.0f} s", (r.get("reason") or "")[:120]]
                        for r in doc.get("steps", [])], ["step", "status", "time", "note"]))
    out.append("")
    folder = Path(doc.get("_dir", "."))
    num = _read(folder / "numerics.json")
    if num:
        res = [r for r in num["results"] if r["check"] == "fused"]
        out.append(f"Numerics ({num['dtype']}, B*T {num['sizes']['rows']}, V {num['sizes']['vocab']}; relative error "
                   f"against the fp32 reference, bounds {num['bounds']}): {len(num['results']) - num['failed']}/"
                   f"{len(num['results'])} checks passed.")
        out.append("")
        out.append(C.table([[r["backend"], r["mode"], f"{r['loss_rel']:.1e}", f"{r['grad_hs_rel']:.1e}",
                             f"{r['grad_hsp_rel']:.1e}", f"{r['grad_w_rel']:.1e}", "ok" if r["ok"] else "FAILED"]
                            for r in res], ["backend", "mode", "loss", "grad h_s", "grad h_sp", "grad W_s", ""]))
        out.append("")
    rk = _read(folder / "row_kernels.json")
    res = [r for r in (rk or {}).get("results", []) if "median_ms" in r]
    if res:
        out.append(f"Row kernels alone, the pass-1 call on [{rk['rows']}, {rk['vocab']}] bf16 (vocab_size "
                   f"{rk['vocab_size']}), gradients in place; bandwidth = bytes the kernel must move / time:")
        out.append("")
        out.append(C.table([[f"`{r['kernel']}`", "default" if r["config"] is None else f"{r['config'][1]} x "
                             f"{r['config'][0]} threads", f"{r['median_ms']:.3f} ms", f"{r['gb_per_s']:.0f} GB/s"]
                            for r in res], ["kernel", "tile", "time", "bandwidth"]))
        out.append("")
    return out


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- gpu model
def gpu_model_section(doc) -> list[str]:
    k = doc.get("constants", {})
    sh = doc.get("shapes", {})
    calibrated = bool(k.get("calibrated_from"))
    title = f"GPU cost model, constants measured on {k.get('device')}" if calibrated else "GPU cost model (no GPU)"
    out = [f"#### {title} ({doc.get('created_utc', '?')})", "",
           f"`python -m benchmarks.gpu_model`: the real host code on fake tensors, {sh.get('dtype')}, V = "
           f"{sh.get('vocab')} (vocab_size {sh.get('vocab_size')}), H_student = {sh.get('hidden_student')}, "
           f"H_teacher = {sh.get('hidden_teacher')}; a modelled {k.get('device', 'GPU')}: GEMMs at "
           f"{k.get('gemm_tflops')} TFLOP/s peak with wave and split-K efficiency, {k.get('hbm_tbps')} TB/s, "
           f"{k.get('sms')} SMs at {k.get('clock_ghz')} GHz for the row kernels' instruction issue, "
           f"{k.get('launch_us')} us per launch, {k.get('sync_us')} us per host sync "
           f"(`{doc['_file']}`; {_ver(doc)}). GEMM floor: the loss's minimal GEMM FLOPs at the peak rate. "
           "Liger: `LigerFusedLinearJSD` (beta = 1) as it runs on Hopper, its Triton JSD kernel counted like ours; "
           "the like-for-like pair is `standard` against `liger_jsd`.", ""]
    cases = doc.get("cases", [])
    liger = {c["rows"]: c for c in cases if c["name"] == "liger_jsd"}
    rows = []
    for c in cases:
        lg = liger.get(c["rows"])
        rows.append([f"`{c['name']}`", str(c["rows"]), str(c.get("chunk_rows")), f"{c['gemm_floor_ms']:.1f} ms",
                     f"{c['modelled_ms']:.1f} ms", f"{c['ratio_to_gemm_floor']:.2f}x",
                     "-" if lg is None or c["name"] == "liger_jsd" else f"{c['modelled_ms'] / lg['modelled_ms']:.2f}x",
                     f"{c.get('row_kernel_ms', 0):.1f} / {c.get('issue_bound_ms', 0):.1f} ms",
                     f"{c.get('row_kernel_regs', '-')} / {c.get('row_kernel_spill_bytes', '-')}",
                     C.fmt_bytes(c["peak_temp_bytes"]), str(c["weight_sized_temporaries"])])
    out.append(C.table(rows, ["case", "B*T", "chunk rows", "GEMM floor", "modelled", "modelled / floor",
                              "time / Liger's", "row kernels / issue bound", "row kernel regs / stack B",
                              "peak temporaries", "fp32 [V, H] tensors"]))
    out.append("")
    return out


# ----------------------------------------------------------------------------- assembly
SECTIONS = {"kernels": kernels_section, "step": step_section, "cpu_rows": cpu_rows_section,
            "gpu_check": gpu_check_section, "gpu_model": gpu_model_section}


def _device_type(doc) -> str:
    if doc["benchmark"] == "gpu_check":
        return "cuda"
    return (doc.get("device") or {}).get("type", "model")


def render(docs: list[dict]) -> str:
    out = ["_Generated by `python -m benchmarks.report --readme README.md` from `benchmarks/results/*.json`; "
           "rerun it after a benchmark run instead of editing by hand. Every time is a median over n timed runs, "
           "n given with it._", ""]
    if not docs:
        out.append("_No benchmark results yet: run `python -m benchmarks.kernels` and `python -m benchmarks.step`._")
        out.append("")
        return "\n".join(out)
    order = {k: i for i, k in enumerate(KINDS)}
    measured = [d for d in docs if d["benchmark"] not in MODELLED]
    modelled = [d for d in docs if d["benchmark"] in MODELLED]
    out += ["### Measured", ""]
    if not any(_device_type(d) == "cuda" for d in measured):
        out.append("_No GPU measurements yet (`make gpu-check` on a GPU machine writes them): the GPU rows (Qwen3-VL "
                   "shapes, bf16) stay open; the modelled GPU numbers are further down._")
        out.append("")
    for d in sorted(measured, key=lambda d: (_device_type(d) != "cuda", order[d["benchmark"]], d["_file"])):
        out += _section(d)
    if modelled:
        out += ["### Modelled", ""]
        for d in sorted(modelled, key=lambda d: d["_file"]):
            out += _section(d)
    return "\n".join(out)


def _section(d) -> list[str]:
    try:
        return SECTIONS[d["benchmark"]](d)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        print(f"warning: {d['_file']}: cannot render ({type(exc).__name__}: {exc})", file=sys.stderr)
        return [f"_`benchmarks/results/{d['_file']}` could not be rendered ({type(exc).__name__})._", ""]


def replace_between_markers(src: str, text: str) -> str | None:
    """``src`` with the text between the marker lines replaced by ``text`` (None without markers)."""
    if src.count(START) != 1 or src.count(END) != 1 or src.index(START) > src.index(END):
        return None
    head, rest = src.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{text.rstrip()}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--include-quick", action="store_true")
    p.add_argument("--readme", help="file whose text between the benchmark markers is replaced")
    p.add_argument("--gpu-check", metavar="DIR", help="render a gpu-check folder's results into DIR/report.md")
    args = p.parse_args(argv)
    if args.gpu_check:
        text = render(load(Path(args.gpu_check), True))
        (Path(args.gpu_check) / "report.md").write_text(text)
        print(text)
        return 0
    text = render(load(Path(args.results_dir), args.include_quick))
    if args.readme:
        path = Path(args.readme)
        new = replace_between_markers(path.read_text(), text)
        if new is None:
            print(f"{path} needs exactly one {START} line followed by one {END} line; printing instead",
                  file=sys.stderr)
            print(text)
            return 1
        path.write_text(new)
        print(f"updated {path}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
