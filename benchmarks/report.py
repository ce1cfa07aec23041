"""The README's benchmark section, generated from ``benchmarks/results/*.json``.

    python -m benchmarks.report                    # print the markdown
    python -m benchmarks.report --readme README.md # replace the text between the marker lines
                                                   # <!-- benchmarks:start --> and <!-- benchmarks:end -->

For every result file (kernels, training step, cpu row kernel): the device it ran on, the shapes,
every B*T row of every fused backend -- those that miss a target included, marked -- and, in every
time cell, the number of timed runs behind the median (``n=?`` for files written before ``n`` was
recorded). Quick (CI-sized) result files are left out unless ``--include-quick``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import common as C

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
KINDS = ("kernels", "step", "cpu_rows")
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
    out = [_heading(doc, "Kernels"), "",
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


# ----------------------------------------------------------------------------- assembly
SECTIONS = {"kernels": kernels_section, "step": step_section, "cpu_rows": cpu_rows_section}


def render(docs: list[dict]) -> str:
    out = ["_Generated by `python -m benchmarks.report --readme README.md` from `benchmarks/results/*.json`; "
           "rerun it after a benchmark run instead of editing by hand. Every time is a median over n timed runs, "
           "n given with it._", ""]
    if not docs:
        out.append("_No benchmark results yet: run `python -m benchmarks.kernels` and `python -m benchmarks.step`._")
        out.append("")
        return "\n".join(out)
    order = {k: i for i, k in enumerate(KINDS)}
    for d in sorted(docs, key=lambda d: (d["device"]["type"] != "cuda", order[d["benchmark"]], d["_file"])):
        try:
            out += SECTIONS[d["benchmark"]](d)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            print(f"warning: {d['_file']}: cannot render ({type(exc).__name__}: {exc})", file=sys.stderr)
            out += [f"_`benchmarks/results/{d['_file']}` could not be rendered ({type(exc).__name__})._", ""]
    if not any(d["device"]["type"] == "cuda" for d in docs):
        out.append("_No GPU results yet: the GPU rows (Qwen3-VL shapes, bf16) stay open._")
        out.append("")
    return "\n".join(out)


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
    args = p.parse_args(argv)
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
