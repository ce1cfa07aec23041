"""Triton row kernel: the ``triton`` backend (row contract of :mod:`vgs_kernels.backends.torch_rows`).

One program per token row streams the row's logits over vocabulary blocks of ``BLOCK_V``:

* **Pass A (statistics)** reads z_s, z_sp, z_t, z_tp once each (all loads upcast to fp32, ``-inf``
  read as ``NEG_LOGIT``, divided by tau) and forms the visual-target logits x_r = x_sp + x_t - x_tp
  in registers. It keeps an online softmax for the five distributions (running max m and
  sum-exp l of p, p', q, q', r) and four online cross terms, each relative to the running maxima,
  e.g. for std = KL(p||q)::

      B_st = sum_i exp(x_s,i - m_s) * ((x_s,i - m_s) - (x_t,i - m_t))

  rescaled when the maxima move (B <- exp(m_s - m_s') * (B + l_s * ((m_s - m_s') - (m_t - m_t'))));
  at the end std = B_st / l_s - log l_s + log l_t, and likewise vis = KL(p||r) (weights p),
  lang = KL(p'||q') (weights p') and vds = KL(q||q') (weights q). Keeping the cross terms relative
  to the maxima avoids cancelling large absolute logits (|z| ~ 1e4) against the log-sum-exps.
* **Pass B (gradients, only when ``grad_zs`` / ``grad_zsp`` are given)** re-reads the row and
  writes, in fp32, grad_zs = p (c_std (log p - log q - std) + c_vis (log p - log r - vis)) / tau and
  grad_zsp = (c_lang p' (log p' - log q' - lang) + c_prior (r - p)) / tau.

Reads per row: without gradients each of the four streams is read once (4 row reads); with
gradients twice (8 row reads) plus one fp32 row write per requested gradient. Gradients need the
final log-sum-exps and KLs, so a second read is the minimum for a streaming kernel (Liger's cross
entropy does the same). When the driver's gated pass feeds the text-only pair as
``(zsp, zsp, ztp, ztp)`` (``mode="vgs"``, language term only), the kernel sees the aliasing and
reads just those two streams (2 reads, 4 with the gradient).

GEMMs of the fused-linear driver (:mod:`vgs_kernels.driver`, shared by every backend), in the
default ``mode="vgs"``: pass 1 runs 4 forward GEMMs per row (z_s, z_sp, z_t, z_tp) + 2 backward
GEMMs for z_s (grad_hidden, grad_weight) and calls this kernel with ``grad_zs``; after the global
VDS quantile, pass 2 revisits only gated rows (~30 % at quantile 0.7) with 2 forward GEMMs
(z_sp, z_tp) + 2 backward GEMMs for z_sp, calling this kernel on the aliased text-only pair:
6 + 4 * 0.3 = 7.2 GEMMs per row, against 8.6 for a teacher-only VDS pre-pass design. The driver
holds at most one chunk of logits per stream (plus one or two fp32 gradient chunks). In
``adaptive`` / ``language`` modes pass 2 re-runs all four forward GEMMs on its rows; with
``detach_target_prior=False`` (or ``language``) pass 1 also writes ``grad_zsp`` (+2 GEMMs).

All arithmetic is fp32; fp64 inputs fall back to the torch row function. In the interpreter
(``TRITON_INTERPRET=1``, CPU tensors) one fixed config is used (``INTERPRET_BLOCK_V``, 4 warps);
on CUDA a heuristic picks ``BLOCK_V`` / ``num_warps`` from V (2048 / 8 warps for large V: 86
registers, no spills on sm_90 per ``cuobjdump``). No autotuning; only ``tl.exp`` / ``tl.log``,
no explicit libdevice calls.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import torch_rows

# Start value of the running maxima (and fill of the padding lanes in the block maxima): below
# every real logit (the smallest is about -3e30 / tau, an x_r made of NEG_LOGIT terms) yet finite,
# so that l_old * (m_old - m_new) is 0, not NaN, on the first block.
_M_INIT = tl.constexpr(-3.0e38)

# Block of the vocabulary per loop step in interpreter mode (small so tests cover several blocks).
INTERPRET_BLOCK_V = 128

# Gradient buffers the kernel writes directly (other dtypes or layouts go through an fp32 buffer).
_STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_scaled(ptr, offs, mask, inv_tau):
    # Padding past V reads as -inf -> NEG_LOGIT (finite, exp -> 0); the reductions also mask it out.
    x = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(x < -1.0e30, -1.0e30, x)  # -inf -> NEG_LOGIT (fp32 upcast first); NaN stays NaN
    return x * inv_tau


@triton.jit
def _vgs_rows_kernel(
    zs_ptr, zsp_ptr, zt_ptr, ztp_ptr,
    stride_zs, stride_zsp, stride_zt, stride_ztp,
    coef_ptr, stats_ptr,
    gs_ptr, gsp_ptr, stride_gs, stride_gsp,
    V, inv_tau,
    HAS_GS: tl.constexpr,
    HAS_GSP: tl.constexpr,
    PRIOR_GRAD: tl.constexpr,
    TWO_STREAMS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_zs
    zt_row = zt_ptr + row * stride_zt
    zsp_row = zsp_ptr + row * stride_zsp
    ztp_row = ztp_ptr + row * stride_ztp
    offs0 = tl.arange(0, BLOCK_V)

    # ---------------------------------------------------------------- pass A: statistics
    m_s = -3.0e38
    m_sp = -3.0e38
    m_t = -3.0e38
    m_tp = -3.0e38
    m_r = -3.0e38
    l_s = 0.0
    l_sp = 0.0
    l_t = 0.0
    l_tp = 0.0
    l_r = 0.0
    b_st = 0.0
    b_sr = 0.0
    b_sptp = 0.0
    b_ttp = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        xs = _load_scaled(zs_row, offs, mask, inv_tau)
        xt = _load_scaled(zt_row, offs, mask, inv_tau)
        if TWO_STREAMS:
            xsp = xs
            xtp = xt
        else:
            xsp = _load_scaled(zsp_row, offs, mask, inv_tau)
            xtp = _load_scaled(ztp_row, offs, mask, inv_tau)
        xr = xsp + xt - xtp

        n_s = tl.maximum(m_s, tl.max(tl.where(mask, xs, _M_INIT), 0))
        n_sp = tl.maximum(m_sp, tl.max(tl.where(mask, xsp, _M_INIT), 0))
        n_t = tl.maximum(m_t, tl.max(tl.where(mask, xt, _M_INIT), 0))
        n_tp = tl.maximum(m_tp, tl.max(tl.where(mask, xtp, _M_INIT), 0))
        n_r = tl.maximum(m_r, tl.max(tl.where(mask, xr, _M_INIT), 0))
        # shifted logits and unnormalised probabilities (0 on the padding past V)
        ds = xs - n_s
        dsp = xsp - n_sp
        dt = xt - n_t
        dtp = xtp - n_tp
        dr = xr - n_r
        es = tl.where(mask, tl.exp(ds), 0.0)
        esp = tl.where(mask, tl.exp(dsp), 0.0)
        et = tl.where(mask, tl.exp(dt), 0.0)
        # old sums -> new maxima: scale factors and max shifts (<= 0)
        u_s = m_s - n_s
        u_sp = m_sp - n_sp
        u_t = m_t - n_t
        u_tp = m_tp - n_tp
        u_r = m_r - n_r
        a_s = tl.exp(u_s)
        a_sp = tl.exp(u_sp)
        a_t = tl.exp(u_t)
        b_st = a_s * (b_st + l_s * (u_s - u_t)) + tl.sum(es * (ds - dt), 0)
        b_sr = a_s * (b_sr + l_s * (u_s - u_r)) + tl.sum(es * (ds - dr), 0)
        b_sptp = a_sp * (b_sptp + l_sp * (u_sp - u_tp)) + tl.sum(esp * (dsp - dtp), 0)
        b_ttp = a_t * (b_ttp + l_t * (u_t - u_tp)) + tl.sum(et * (dt - dtp), 0)
        l_s = l_s * a_s + tl.sum(es, 0)
        l_sp = l_sp * a_sp + tl.sum(esp, 0)
        l_t = l_t * a_t + tl.sum(et, 0)
        l_tp = l_tp * tl.exp(u_tp) + tl.sum(tl.where(mask, tl.exp(dtp), 0.0), 0)
        l_r = l_r * tl.exp(u_r) + tl.sum(tl.where(mask, tl.exp(dr), 0.0), 0)
        m_s = n_s
        m_sp = n_sp
        m_t = n_t
        m_tp = n_tp
        m_r = n_r

    g_s = tl.log(l_s)
    g_sp = tl.log(l_sp)
    g_t = tl.log(l_t)
    g_tp = tl.log(l_tp)
    g_r = tl.log(l_r)
    std = b_st / l_s - g_s + g_t
    vis = b_sr / l_s - g_s + g_r
    lang = b_sptp / l_sp - g_sp + g_tp
    vds = b_ttp / l_t - g_t + g_tp
    stats_row = stats_ptr + row * 4
    tl.store(stats_row + 0, std)
    tl.store(stats_row + 1, vis)
    tl.store(stats_row + 2, lang)
    tl.store(stats_row + 3, vds)

    # ---------------------------------------------------------------- pass B: gradients
    if HAS_GS or HAS_GSP:
        c_std = tl.load(coef_ptr + row * 3 + 0)
        c_vis = tl.load(coef_ptr + row * 3 + 1)
        c_lang = tl.load(coef_ptr + row * 3 + 2)
        gs_row = gs_ptr + row * stride_gs
        gsp_row = gsp_ptr + row * stride_gsp
        for start in range(0, V, BLOCK_V):
            offs = start + offs0
            mask = offs < V
            if TWO_STREAMS:
                xsp = _load_scaled(zs_row, offs, mask, inv_tau)
                xtp = _load_scaled(zt_row, offs, mask, inv_tau)
                xs = xsp
                xt = xtp
            else:
                xsp = _load_scaled(zsp_row, offs, mask, inv_tau)
                xtp = _load_scaled(ztp_row, offs, mask, inv_tau)
                if HAS_GS or PRIOR_GRAD:
                    xs = _load_scaled(zs_row, offs, mask, inv_tau)
                    xt = _load_scaled(zt_row, offs, mask, inv_tau)
            if HAS_GS or PRIOR_GRAD:
                lp = (xs - m_s) - g_s
                p = tl.exp(lp)
                lr = ((xsp + xt - xtp) - m_r) - g_r
            if HAS_GS:
                lq = (xt - m_t) - g_t
                grad = p * (c_std * (lp - lq - std) + c_vis * (lp - lr - vis))
                tl.store(gs_row + offs, grad * inv_tau, mask=mask)
            if HAS_GSP:
                lpp = (xsp - m_sp) - g_sp
                lqp = (xtp - m_tp) - g_tp
                grad_p = tl.exp(lpp) * (c_lang * (lpp - lqp - lang))
                if PRIOR_GRAD:
                    grad_p += c_vis * (tl.exp(lr) - p)
                tl.store(gsp_row + offs, grad_p * inv_tau, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): one fixed config in the interpreter, a V-based heuristic on CUDA."""
    if device.type != "cuda" or _interpreting():
        return INTERPRET_BLOCK_V, 4
    block = min(2048, triton.next_power_of_2(max(vocab, 16)))
    return block, (8 if block >= 2048 else 4)


def _row_major(z: torch.Tensor) -> torch.Tensor:
    """A 2-D view with a contiguous last dim (the driver's views already are)."""
    return z if z.stride(-1) == 1 or z.shape[-1] <= 1 else z.contiguous()


def vgs_rows(
    zs: torch.Tensor,
    zsp: torch.Tensor,
    zt: torch.Tensor,
    ztp: torch.Tensor,
    coef: torch.Tensor,
    *,
    temperature: float,
    detach_target_prior: bool,
    grad_zs: torch.Tensor | None = None,
    grad_zsp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Four KLs per row ([n, 4] fp32) and optionally the logit gradients; see torch_rows."""
    if zs.dtype == torch.float64:
        return torch_rows.vgs_rows(
            zs, zsp, zt, ztp, coef, temperature=temperature,
            detach_target_prior=detach_target_prior, grad_zs=grad_zs, grad_zsp=grad_zsp,
        )
    n, vocab = zs.shape
    stats = torch.empty(n, 4, device=zs.device, dtype=torch.float32)
    if n == 0:
        return stats
    if vocab == 0:
        raise ValueError("the vocabulary is empty")
    two = (
        zs.data_ptr() == zsp.data_ptr() and zs.stride() == zsp.stride() and zs.dtype == zsp.dtype
        and zt.data_ptr() == ztp.data_ptr() and zt.stride() == ztp.stride() and zt.dtype == ztp.dtype
    )
    zs, zsp, zt, ztp = (_row_major(z) for z in (zs, zsp, zt, ztp))
    coef = coef.to(device=zs.device, dtype=torch.float32).contiguous()
    outs = []
    for g in (grad_zs, grad_zsp):
        if g is None:
            outs.append(None)
        elif g.dtype in _STORE_DTYPES and (g.stride(-1) == 1 or vocab == 1):
            outs.append(g)  # the store rounds fp32 to the buffer's dtype
        else:  # the driver passes fp32 contiguous buffers; be lenient otherwise
            outs.append(torch.empty(n, vocab, device=zs.device, dtype=torch.float32))
    gs, gsp = outs
    prior_grad = gsp is not None and not detach_target_prior
    block, warps = _config(vocab, zs.device)
    dummy = stats  # never dereferenced when the matching HAS_* flag is off
    with torch.cuda.device(zs.device) if zs.is_cuda else contextlib.nullcontext():
        _vgs_rows_kernel[(n,)](
            zs, zsp, zt, ztp,
            zs.stride(0), zsp.stride(0), zt.stride(0), ztp.stride(0),
            coef, stats,
            gs if gs is not None else dummy, gsp if gsp is not None else dummy,
            gs.stride(0) if gs is not None else 0, gsp.stride(0) if gsp is not None else 0,
            vocab, 1.0 / float(temperature),
            HAS_GS=gs is not None, HAS_GSP=gsp is not None, PRIOR_GRAD=prior_grad,
            TWO_STREAMS=two, BLOCK_V=block, num_warps=warps,
        )
    for g, out in ((grad_zs, gs), (grad_zsp, gsp)):
        if g is not None and out is not g:
            g.copy_(out)
    return stats
