"""Markdown tables for the README from ``benchmarks/results/*.json``.

    python -m benchmarks.report                    # print the markdown
    python -m benchmarks.report --readme README.md # replace the text between the markers
                                                   # <!-- benchmarks:start --> and <!-- benchmarks:end -->

Quick (CI-sized) result files are left out unless ``--include-quick``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import common as C

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def load(results_dir: Path, include_quick: bool) -> list[dict]:
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        if doc.get("benchmark") not in ("kernels", "step"):
            continue  # other benchmarks' files (their own reports)
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


def _load(doc) -> str:
    la = (doc.get("machine_state_start") or {}).get("loadavg_1_5_15")
    return "" if not la else f"; load average at start {la[0]:.1f} on {doc['device'].get('cpu_count')} CPUs"


def _notes(doc) -> list[str]:
    return [f"> {n}" for n in doc.get("notes") or []]


def kernels_section(doc) -> list[str]:
    sh = doc["shapes"]
    ok = {(r["bt"], r["case"]): r for r in doc["results"] if r.get("status") == "ok"}
    allr = {(r["bt"], r["case"]): r for r in doc["results"]}
    names = list(doc["cases"])
    bts = sh["bt"]
    out = [f"#### Kernels: {doc['device']['name']} ({doc['created_utc']})", "",
           f"Fused-linear loss forward + backward, {sh['dtype']}, V = {sh['vocab']}, H_student = "
           f"{sh['hidden_student']}, H_teacher = {sh['hidden_teacher']}; median of up to {doc['timing']['repeats']} "
           f"timed runs (at least {doc['timing']['min_repeats']}; counts per cell in the JSON) (`{doc['_file']}`; {_ver(doc)}{_load(doc)}).", ""]
    out += _notes(doc) + ([""] if doc.get("notes") else [])

    def cell(bt, n, key):
        r = ok.get((bt, n))
        if r:
            return C.fmt_time(r["median_s"]) if key == "t" else C.fmt_bytes(r.get("peak_bytes"))
        r = allr.get((bt, n))
        return r["status"] if r else "-"

    head = ["case"] + [f"B*T={b}" for b in bts]
    out.append("Time (median):")
    out.append("")
    out.append(C.table([[f"`{n}`", *(cell(b, n, "t") for b in bts)] for n in names], head))
    out.append("")
    out.append(f"Peak memory above the inputs ({'CUDA allocator' if doc['device']['type'] == 'cuda' else 'CPU allocator, torch.profiler'}):")
    out.append("")
    out.append(C.table([[f"`{n}`", *(cell(b, n, "m") for b in bts)] for n in names
                        if not n.startswith("gemm_floor")], head))
    out.append("")
    rows = doc.get("ratios", {}).get("rows", [])
    if rows:
        out.append("Ratios against the targets (time / Liger <= 2.0x; GEMM floor >= 65 % (GPU target); "
                   "memory / Liger <= 1.2x; reference memory / VGS >= 8x):")
        out.append("")
        tr = []
        for r in rows:
            ref = r.get("reference_mem_over_vgs")
            ref_s = C.fmt_ratio(ref) if ref is not None else (
                C.fmt_ratio(r["reference_mem_over_vgs_extrapolated"]) + f" (extrap. from {r['reference_extrapolated_from_bt']})"
                if r.get("reference_mem_over_vgs_extrapolated") is not None else "-")
            tr.append([str(r["bt"]), f"`{r['backend']}`", C.fmt_ratio(r.get("time_vs_liger:chunked")),
                       C.fmt_ratio(r.get("time_vs_liger:triton")),
                       _pct(r.get("gemm_floor_fraction")), _pct(r.get("gemm_floor_driver_fraction")),
                       C.fmt_ratio(r.get("mem_vs_liger:chunked")), C.fmt_ratio(r.get("mem_vs_liger:triton")), ref_s,
                       C.fmt_ratio(r.get("time_vs_own_standard"))])
        out.append(C.table(tr, ["B*T", "backend", "time / Liger chunked", "time / Liger Triton", "GEMM floor / time",
                                "driver GEMM floor / time",
                                "mem / Liger chunked", "mem / Liger Triton", "reference mem / VGS",
                                "VGS / own standard"]))
        out.append("")
    if doc.get("skipped"):
        out.append("Not run here: " + "; ".join(f"`{k}` ({v})" for k, v in doc["skipped"].items()
                                                 if "not selected" not in v) + ".")
        out.append("")
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def step_section(doc) -> list[str]:
    cfg = doc["config"]
    res = doc["results"]
    keys = ("rollout", "forwards", "loss_backward", "optimizer", "non_generation", "step")
    out = [f"#### Training step: {doc['device']['name']} ({doc['created_utc']})", "",
           f"Preset `{doc['preset']}` (student {doc['params']['student'] / 1e6:.2f} M, teacher "
           f"{doc['params']['teacher'] / 1e6:.2f} M parameters, {cfg['dtype']}), batch {cfg['batch']} x "
           f"{cfg['response']} response tokens, vocabulary {cfg['vocab']}; median of {doc['timing']['repeats']} "
           f"steps per method (`{doc['_file']}`; {_ver(doc)}{_load(doc)}).", ""]
    out += _notes(doc) + ([""] if doc.get("notes") else [])
    out.append(C.table([[f"`{m}`", *(C.fmt_time(res[m][k]) for k in keys)] for m in res], ["method", *keys]))
    out.append("")
    rat = doc.get("paired_ratios") or doc.get("ratios", {})
    if rat:
        names = list(rat)
        out.append("Ratios (median over repeats of the per-repeat ratio; methods alternate within a repeat and "
                   "share its rollout):")
        out.append("")
        out.append(C.table([[k, *(C.fmt_ratio(rat[n][k]) for n in names)] for k in keys],
                           ["part", *(n.replace("_over_", " / ") for n in names)]))
        out.append("")
    for t in doc.get("targets", []):
        out.append(f"- VGS / OPD, {t['part'].replace('_', '-')}: {t['value']:.2f}x (target {t['bound']}: "
                   f"{'met' if t['met'] else 'missed'})")
    out.append("")
    return out


def render(docs: list[dict]) -> str:
    if not docs:
        return "_No benchmark results yet: run `python -m benchmarks.kernels` and `python -m benchmarks.step`._\n"
    out = []
    for d in sorted(docs, key=lambda d: (d["benchmark"] != "kernels", d["device"]["type"] != "cuda", d["_file"])):
        out += kernels_section(d) if d["benchmark"] == "kernels" else step_section(d)
    gpu = any(d["device"]["type"] == "cuda" for d in docs)
    if not gpu:
        out.append("_No GPU results yet: the GPU rows (Qwen3-VL shapes, bf16) stay open._")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--include-quick", action="store_true")
    p.add_argument("--readme", help="file whose text between the benchmark markers is replaced")
    args = p.parse_args(argv)
    text = render(load(Path(args.results_dir), args.include_quick))
    if args.readme:
        path = Path(args.readme)
        src = path.read_text()
        if START not in src or END not in src:
            print(f"{path} has no {START} ... {END} markers; printing instead", file=sys.stderr)
            print(text)
            return 1
        head, rest = src.split(START, 1)
        _, tail = rest.split(END, 1)
        path.write_text(f"{head}{START}\n{text}\n{END}{tail}")
        print(f"updated {path}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
