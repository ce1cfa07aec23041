"""Numeric checks of the GPU backends at Qwen sizes, against an fp32 reference on the same device.

    python -m benchmarks.gpu_numerics                     # CUDA: B*T 4096, H 2048 / 4096, V 151936, bf16
    python -m benchmarks.gpu_numerics --device cpu --small  # the same checks on the CPU backends, small sizes

Three checks; any failure exits 1 (and ``--json`` says which):

1. **row kernels**: each backend's row function on a chunk of random logit rows ([256, V] in the
   input dtype), its gradients written into buffers poisoned with NaN beforehand (every entry must be
   written: the padding columns [vocab_size, V) with 0) and, as the driver calls it, in place into the
   logits themselves; KLs and gradients against the torch row function on the same rows upcast to fp32.
2. **fused loss**: ``fused_linear_vgs_loss`` for each backend and mode (standard, vgs, adaptive,
   language) from bf16 hidden states and lm_heads, masked rows included: loss and the gradients of the
   student's hidden states (both views) and lm_head against an fp32 reference computed chunk by chunk
   with autograd on the same device (logits never all in memory), given the fused call's gate (a gate
   decision that flips on a near-tie is checked separately: the VDS against the reference's).
3. **accumulation path**: every weight-gradient GEMM went the in-place fp32 way (``addmm_fp32_out`` on
   CUDA with torch >= 2.10, ``upcast`` on the CPU); the 8192-row slab fallback fails the check.

``--inject`` (for the CPU test of ``make gpu-check``): ``exception`` raises mid-way, ``wrong_number`` makes
one gradient 5 % too large, ``slab_fallback`` forces the slab path (``vgs_kernels.gemm.ADDMM_FP32_OUT``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

MODES = ("standard", "vgs", "adaptive", "language")
QWEN = dict(rows=4096, hs=2048, ht=4096, vocab=151936, vocab_size=151669)
SMALL = dict(rows=96, hs=32, ht=48, vocab=1000, vocab_size=990)
# relative-error bounds (||got - ref|| / ||ref||; the reference in fp32 on the same rounded logits): what is
# left is the logit gradients' rounding to the input dtype (2^-9 per entry in bf16: about 2e-3 measured on
# the CPU backends) and the GEMMs' order of summation; a wrong term or factor, or an unwritten entry, is
# far above (the injected 5 % error fails)
BOUNDS = {"bfloat16": dict(loss=1e-4, grad=1e-2, stats=1e-3), "float16": dict(loss=1e-4, grad=3e-3, stats=1e-3),
          "float32": dict(loss=1e-5, grad=1e-4, stats=1e-5)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- 1. row kernels
def check_rows(backend: str, device, dtype, n: int, vocab: int, vocab_size: int, inject: str | None) -> list[dict]:
    from vgs_kernels.backends import resolve, torch_rows

    fn = resolve(backend, device).rows_fn
    g = torch.Generator(device=device).manual_seed(1)
    z = [torch.randn(n, vocab, generator=g, device=device).mul_(3).to(dtype) for _ in range(4)]
    for x in z:  # a shared vocabulary mask: -inf at the same ids in every stream
        x[0, 5] = x[1, 7] = float("-inf")
    coef = torch.rand(n, 3, generator=g, device=device) / n
    out = []
    for prior in (True, False):
        ref_gs = torch.empty(n, vocab, device=device)
        ref_gsp = torch.empty(n, vocab, device=device)
        ref = torch_rows.vgs_rows(*[x.float() for x in z], coef, temperature=0.7, detach_target_prior=prior,
                                  grad_zs=ref_gs, grad_zsp=ref_gsp, vocab=vocab_size)
        for where in ("poisoned", "in_place"):
            if where == "poisoned":
                gs = torch.full((n, vocab), float("nan"), device=device, dtype=dtype)
                gsp = torch.full((n, vocab), float("nan"), device=device, dtype=dtype)
                zz = z
            else:
                zz = [x.clone() for x in z]
                gs, gsp = zz[0], zz[1]
            stats = fn(*zz, coef, temperature=0.7, detach_target_prior=prior, grad_zs=gs, grad_zsp=gsp,
                       vocab=vocab_size)
            if inject == "wrong_number":
                gs = gs * 1.05
            unwritten = int((~torch.isfinite(gs)).sum() + (~torch.isfinite(gsp)).sum())
            pad_nonzero = int((gs[:, vocab_size:] != 0).sum() + (gsp[:, vocab_size:] != 0).sum())
            r = {"check": "rows", "backend": backend, "detach_target_prior": prior, "buffers": where,
                 "shape": [n, vocab], "vocab_size": vocab_size, "dtype": str(dtype),
                 "stats_rel": rel(stats, ref), "grad_zs_rel": rel(gs.float(), ref_gs),
                 "grad_zsp_rel": rel(gsp.float(), ref_gsp), "unwritten": unwritten, "padding_nonzero": pad_nonzero}
            b = BOUNDS[str(dtype).replace("torch.", "")]
            r["ok"] = (unwritten == 0 and pad_nonzero == 0 and r["stats_rel"] <= b["stats"]
                       and r["grad_zs_rel"] <= b["grad"] and r["grad_zsp_rel"] <= b["grad"])
            out.append(r)
    return out


# ----------------------------------------------------------------------------- 2. fused loss
def inputs(device, dtype, rows: int, hs: int, ht: int, vocab: int, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    B = 4
    T = rows // B
    h = [torch.randn(B, T, d, generator=g, device=device).to(dtype) for d in (hs, hs, ht, ht)]
    ws = (torch.randn(vocab, hs, generator=g, device=device) * (2.0 / hs ** 0.5)).to(dtype)
    wt = (torch.randn(vocab, ht, generator=g, device=device) * (2.0 / ht ** 0.5)).to(dtype)
    h[2] = (h[0].float() @ torch.randn(hs, ht, generator=g, device=device) / hs ** 0.5).to(dtype)  # correlated
    mask = torch.rand(B, T, generator=g, device=device) < 0.9
    mask[1] = False  # an empty sequence
    return h, ws, wt, mask


def reference(h, ws, wt, mask, mode, gate, vocab_size, chunk=256, alpha=2.0, beta=0.01):
    """fp32 loss and gradients (h_s, h_sp, w_s) by autograd, chunk by chunk; ``gate`` [n_valid] from the
    fused call (VDS quantiles for the adaptive ramp from this reference's own VDS). The logits are rounded
    to the inputs' dtype as the fused path stores them (the gradient passes the rounding unchanged), so the
    difference measures the row kernels, the driver and the gradients' own rounding, not the precision of
    bf16 logits."""
    dev = ws.device
    hs, hsp, ht, htp = (x.reshape(-1, x.shape[-1]).float() for x in h)
    Ws, Wt = ws[:vocab_size].float().contiguous(), wt[:vocab_size].float().contiguous()
    flat = mask.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    counts = mask.sum(1)
    n_seq = int((counts > 0).sum())
    weight = (1.0 / (counts.clamp_min(1).float() * n_seq))[:, None].expand_as(mask).reshape(-1)[idx]

    low = h[0].dtype

    def logits(x, w):
        z = x @ w.T
        return z + (z.to(low).float() - z).detach()  # rounded like the fused path's logits buffers

    def terms(rows, grad):
        with torch.set_grad_enabled(grad):
            xs, xsp = logits(hs[rows], Ws), logits(hsp[rows], Ws)
            xt, xtp = logits(ht[rows], Wt), logits(htp[rows], Wt)
            ls, lsp, lt, ltp = (torch.log_softmax(x, -1) for x in (xs, xsp, xt, xtp))
            lr = torch.log_softmax(xsp.detach() + xt - xtp, -1)

            def kl(a, b):
                return (a.exp() * (a - b)).sum(-1)

            return kl(ls, lt), kl(ls, lr), kl(lsp, ltp), kl(lt, ltp)

    with torch.no_grad():
        vds = torch.cat([terms(idx[a:a + chunk], False)[3] for a in range(0, idx.numel(), chunk)])
    q4, q7 = torch.quantile(vds, torch.tensor([0.4, 0.7], device=dev)).tolist()
    ramp = ((vds - q4) / (q7 - q4)).clamp(0, 1) if q7 > q4 else (vds > q7).float()
    hs.requires_grad_(), hsp.requires_grad_(), Ws.requires_grad_()
    total = torch.zeros((), device=dev, dtype=torch.float64)
    for a in range(0, idx.numel(), chunk):
        rows = idx[a:a + chunk]
        std, vis, lang, _ = terms(rows, True)
        gt, w, rp = gate[a:a + chunk], weight[a:a + chunk], ramp[a:a + chunk]
        obj = {"standard": std, "vgs": std + alpha * vis + beta * gt * lang,
               "adaptive": std + alpha * rp * vis + beta * gt * lang,
               "language": std + alpha * lang + beta * gt * vis}[mode]
        loss = (w * obj).sum()
        loss.backward()
        total += loss.detach().double()
    g_hsp = hsp.grad if hsp.grad is not None else torch.zeros_like(hsp)  # standard mode: no text-view term
    return float(total), hs.grad.reshape(h[0].shape), g_hsp.reshape(h[1].shape), Ws.grad, vds


def check_fused(backend: str, device, dtype, sizes: dict, inject: str | None) -> list[dict]:
    from vgs_kernels import fused_linear_vgs_loss, hooks

    h, ws, wt, mask = inputs(device, dtype, sizes["rows"], sizes["hs"], sizes["ht"], sizes["vocab"])
    out = []
    for mode in MODES:
        hs, hsp = (x.clone().requires_grad_() for x in h[:2])
        w = ws.clone().requires_grad_()
        with hooks.observe(rec := hooks.Recorder()):
            res = fused_linear_vgs_loss(hs, hsp, w, h[2], h[3], wt, mask, mode=mode, vocab_size=sizes["vocab_size"],
                                        backend=backend, return_per_token=True, vds_scope="local")
            res.loss.backward()
        if inject == "exception" and mode == "adaptive":
            raise RuntimeError("injected failure (--inject exception)")
        gate = res.per_token["gate"][mask].float()
        ref_loss, g_hs, g_hsp, g_w, vds = reference(h, ws, wt, mask, mode, gate, sizes["vocab_size"])
        got_w = w.grad.float()[: sizes["vocab_size"]]
        if inject == "wrong_number" and mode == "vgs":
            got_w = got_w * 1.05
        b = BOUNDS[str(dtype).replace("torch.", "")]
        r = {"check": "fused", "backend": backend, "mode": mode, "rows": int(mask.numel()), "valid": int(mask.sum()),
             "hs": sizes["hs"], "ht": sizes["ht"], "vocab": sizes["vocab"], "dtype": str(dtype),
             "loss": float(res.loss.detach()), "ref_loss": ref_loss,
             "loss_rel": abs(float(res.loss.detach()) - ref_loss) / max(abs(ref_loss), 1e-30),
             "grad_hs_rel": rel(hs.grad.float(), g_hs), "grad_hsp_rel": rel(hsp.grad.float(), g_hsp) if mode != "standard"
             else float(hsp.grad.float().abs().max()), "grad_w_rel": rel(got_w, g_w),
             "w_padding_grad_max": float(w.grad.float()[sizes["vocab_size"]:].abs().max()) if sizes["vocab"] >
             sizes["vocab_size"] else 0.0,
             "vds_rel": rel(res.per_token["vds"][mask], vds),
             "accumulate_paths": sorted({e["path"] for e in rec.of("accumulate")})}
        r["ok"] = (r["loss_rel"] <= b["loss"] and r["grad_hs_rel"] <= b["grad"] and r["grad_w_rel"] <= b["grad"]
                   and r["grad_hsp_rel"] <= (b["grad"] if mode != "standard" else 0.0) and r["w_padding_grad_max"] == 0
                   and r["vds_rel"] <= b["stats"])
        out.append(r)
        del hs, hsp, w, res, g_hs, g_hsp, g_w
    return out


def accumulation_ok(device, paths: set[str]) -> tuple[bool, str]:
    """The weight gradient must be accumulated in place in fp32: one GEMM per chunk on CUDA with torch >= 2.10."""
    new_torch = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 10)
    if "slabs" in paths and (device.type != "cuda" or new_torch):
        return False, f"the slab fallback ran (paths {sorted(paths)})"
    if device.type == "cuda" and new_torch and paths != {"addmm_fp32_out"}:
        return False, f"expected only addmm_fp32_out on CUDA with torch {torch.__version__}, got {sorted(paths)}"
    return True, f"paths {sorted(paths)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_numerics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small sizes (CPU tests)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(BOUNDS))
    p.add_argument("--backends", nargs="+", help="default: triton and cuda on CUDA, cpu and torch on the CPU")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--inject", choices=["exception", "wrong_number", "slab_fallback"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sizes = SMALL if args.small else QWEN
    backends = args.backends or (["triton", "cuda"] if device.type == "cuda" else ["cpu", "torch"])
    if args.inject == "slab_fallback":
        from vgs_kernels import gemm

        gemm.ADDMM_FP32_OUT = False
    t0 = time.time()
    results = []
    for be in backends:
        results += check_rows(be, device, dtype, 256 if not args.small else 24, sizes["vocab"], sizes["vocab_size"],
                              args.inject)
        results += check_fused(be, device, dtype, sizes, args.inject)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    paths = {p_ for r in results for p_ in r.get("accumulate_paths", [])}
    ok_acc, why = accumulation_ok(device, paths)
    results.append({"check": "accumulate", "ok": ok_acc, "detail": why})
    for r in results:
        keys = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in r.items() if k.endswith("_rel")}
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:10s} {r.get('backend', ''):7s} "
              f"{r.get('mode', r.get('buffers', ''))!s:10s} {keys if keys else r.get('detail', '')}", flush=True)
    failed = [r for r in results if not r["ok"]]
    doc = {"device": str(device), "sizes": sizes, "dtype": args.dtype, "bounds": BOUNDS[args.dtype],
           "torch": torch.__version__, "seconds": time.time() - t0, "results": results, "failed": len(failed)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"{len(results) - len(failed)}/{len(results)} checks passed in {doc['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
