"""Triton row kernel: the ``triton`` backend (row contract of :mod:`vgs_kernels.backends.torch_rows`).

One program per token row streams the row's ids [0, vocab) in blocks of ``BLOCK_V`` (unmasked full
blocks, then one masked tail); columns [vocab, width) are padding, never read:

* **Pass A (statistics)** reads z_s, z_sp, z_t, z_tp once each (all loads upcast to fp32, ``-inf``
  read as ``NEG_LOGIT``, divided by tau) and forms the visual-target logits x_r = x_sp + x_t - x_tp
  in registers. Every lane (one entry of the block) keeps its own online softmax for the five
  distributions (running max m and sum-exp l of p, p', q, q', r) and four cross terms, relative
  to its running maxima, e.g. for std = KL(p||q)::

      B_st = sum_i exp(x_s,i - m_s) * ((x_s,i - m_s) - (x_t,i - m_t))

  updated entry by entry with one exp per stream (exp(-|x - m|) is either the rescale of the old
  sums or the new entry's weight) and no reduction inside the loop; after the loop one reduction
  per quantity re-expresses the lanes relative to the row maxima M
  (B <- sum_lanes exp(m_s - M_s) * (B + l_s * ((m_s - M_s) - (m_t - M_t)))). Then std =
  B_st / l_s - log l_s + log l_t, and likewise vis = KL(p||r) (weights p), lang = KL(p'||q')
  (weights p') and vds = KL(q||q') (weights q). Keeping the cross terms relative to the maxima
  avoids cancelling large absolute logits (|z| ~ 1e4) against the log-sum-exps.
* **Pass B (gradients, only when ``grad_zs`` / ``grad_zsp`` are given)** re-reads the row and
  writes grad_zs = p (c_std (log p - log q - std) + c_vis (log p - log r - vis)) / tau and
  grad_zsp = (c_lang p' (log p' - log q' - lang) + c_prior (r - p)) / tau, rounded to the buffers'
  dtype (the logits' own: the driver passes the logits buffers, written in place after each
  block's loads), and 0 on the padding columns.

Reads per row: without gradients each of the four streams is read once (4 row reads); with
gradients twice (8 row reads) plus one row write per requested gradient. Gradients need the
final log-sum-exps and KLs, so a second read is the minimum for a streaming kernel (Liger's cross
entropy does the same). When the driver's correction pass feeds the text-only pair as
``(zsp, zsp, ztp, ztp)`` (``mode="vgs"``, language term only), the kernel sees the aliasing and
reads just those two streams (2 reads, 4 with the gradient). The GEMMs around it are the driver's
(:mod:`vgs_kernels.driver`).

All arithmetic is fp32; fp64 inputs fall back to the torch row function. In the interpreter
(``TRITON_INTERPRET=1``, CPU tensors) one fixed config is used (``INTERPRET_BLOCK_V``, 4 warps);
on CUDA a heuristic picks ``BLOCK_V`` / ``num_warps`` from V (1024 / 8 warps for large V: 4 lanes
per thread, 102-126 registers, no spills on sm_90 per ``cuobjdump``; ``CONFIG_OVERRIDE`` replaces
it, for sweeps). No autotuning; only ``tl.exp`` / ``tl.log``, no explicit libdevice calls. No
split of a row over several programs: the driver's chunks (>= 1024 rows at Qwen shapes) fill the
GPU with one program per row.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import torch_rows

# Start value of the running maxima: below every real logit (the smallest is about -3e30 / tau, an
# x_r made of NEG_LOGIT terms) yet finite, so that l_old * (m_old - m_new) is 0, not NaN, at first.
_M_INIT = tl.constexpr(-3.0e38)

# Block of the vocabulary per loop step in interpreter mode (small so tests cover several blocks).
INTERPRET_BLOCK_V = 128
# Largest block on CUDA (one lane per entry of a block, each lane with its own running state).
BLOCK_V_MAX = 1024

# Gradient buffers the kernel writes directly (other dtypes or layouts go through an fp32 buffer).
_STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_scaled(ptr, offs, mask, inv_tau, MASKED: tl.constexpr):
    # -inf -> NEG_LOGIT (after the fp32 upcast; NaN stays NaN), then / tau; lanes past the end of the
    # row (MASKED blocks only) read as NEG_LOGIT (probability 0) and are left out by _lane_step
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(ptr + offs).to(tl.float32)
    return tl.where(x < -1.0e30, -1.0e30, x) * inv_tau


@triton.jit
def _lane_step(m, x, mask, MASKED: tl.constexpr):
    """One new entry x per lane against the lane's running maximum m: (new maximum n, u = m - n,
    d = x - n, exp(u), exp(d)), with a single exp (one of u, d is 0). Masked lanes add nothing."""
    up = x > m
    if MASKED:
        up = up & mask
    t = tl.exp(-tl.abs(x - m))
    n = tl.where(up, x, m)
    u = tl.where(up, m - x, 0.0)
    d = tl.where(up, 0.0, x - m)
    a = tl.where(up, t, 1.0)
    e = tl.where(up, 1.0, t)
    if MASKED:
        e = tl.where(mask, e, 0.0)
    return n, u, d, a, e


@triton.jit
def _stats_block(
    zs_row, zsp_row, zt_row, ztp_row, offs, mask, inv_tau,
    m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp,
    TWO_STREAMS: tl.constexpr, MASKED: tl.constexpr,
):
    """Per-lane online softmax of the five streams over one block, and the four KL numerators
    B_ab = sum e_a ((x_a - m_a) - (x_b - m_b)) relative to the lane maxima (no block reduction)."""
    xs = _load_scaled(zs_row, offs, mask, inv_tau, MASKED)
    xt = _load_scaled(zt_row, offs, mask, inv_tau, MASKED)
    if TWO_STREAMS:
        xsp = xs
        xtp = xt
    else:
        xsp = _load_scaled(zsp_row, offs, mask, inv_tau, MASKED)
        xtp = _load_scaled(ztp_row, offs, mask, inv_tau, MASKED)
    xr = xsp + xt - xtp
    n_s, u_s, d_s, a_s, e_s = _lane_step(m_s, xs, mask, MASKED)
    n_sp, u_sp, d_sp, a_sp, e_sp = _lane_step(m_sp, xsp, mask, MASKED)
    n_t, u_t, d_t, a_t, e_t = _lane_step(m_t, xt, mask, MASKED)
    n_tp, u_tp, d_tp, a_tp, e_tp = _lane_step(m_tp, xtp, mask, MASKED)
    n_r, u_r, d_r, a_r, e_r = _lane_step(m_r, xr, mask, MASKED)
    b_st = a_s * (b_st + l_s * (u_s - u_t)) + e_s * (d_s - d_t)
    b_sr = a_s * (b_sr + l_s * (u_s - u_r)) + e_s * (d_s - d_r)
    b_sptp = a_sp * (b_sptp + l_sp * (u_sp - u_tp)) + e_sp * (d_sp - d_tp)
    b_ttp = a_t * (b_ttp + l_t * (u_t - u_tp)) + e_t * (d_t - d_tp)
    l_s = l_s * a_s + e_s
    l_sp = l_sp * a_sp + e_sp
    l_t = l_t * a_t + e_t
    l_tp = l_tp * a_tp + e_tp
    l_r = l_r * a_r + e_r
    return n_s, n_sp, n_t, n_tp, n_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp


@triton.jit
def _grad_block(
    zs_row, zsp_row, zt_row, ztp_row, gs_row, gsp_row, offs, mask, inv_tau,
    m_s, m_sp, m_t, m_tp, m_r, g_s, g_sp, g_t, g_tp, g_r, std, vis, lang, c_std, c_vis, c_lang,
    HAS_GS: tl.constexpr, HAS_GSP: tl.constexpr, PRIOR_GRAD: tl.constexpr, TWO_STREAMS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Logit gradients of one block, stored in the buffers' dtype (after every load of the block:
    the buffers may be the logits themselves)."""
    if TWO_STREAMS:
        xsp = _load_scaled(zs_row, offs, mask, inv_tau, MASKED)
        xtp = _load_scaled(zt_row, offs, mask, inv_tau, MASKED)
        xs = xsp
        xt = xtp
    else:
        xsp = _load_scaled(zsp_row, offs, mask, inv_tau, MASKED)
        xtp = _load_scaled(ztp_row, offs, mask, inv_tau, MASKED)
        if HAS_GS or PRIOR_GRAD:
            xs = _load_scaled(zs_row, offs, mask, inv_tau, MASKED)
            xt = _load_scaled(zt_row, offs, mask, inv_tau, MASKED)
    if HAS_GS or PRIOR_GRAD:
        lp = (xs - m_s) - g_s
        p = tl.exp(lp)
        lr = ((xsp + xt - xtp) - m_r) - g_r
    if HAS_GS:
        lq = (xt - m_t) - g_t
        grad = p * (c_std * (lp - lq - std) + c_vis * (lp - lr - vis))
        if MASKED:
            tl.store(gs_row + offs, grad * inv_tau, mask=mask)
        else:
            tl.store(gs_row + offs, grad * inv_tau)
    if HAS_GSP:
        lpp = (xsp - m_sp) - g_sp
        lqp = (xtp - m_tp) - g_tp
        grad_p = tl.exp(lpp) * (c_lang * (lpp - lqp - lang))
        if PRIOR_GRAD:
            grad_p += c_vis * (tl.exp(lr) - p)
        if MASKED:
            tl.store(gsp_row + offs, grad_p * inv_tau, mask=mask)
        else:
            tl.store(gsp_row + offs, grad_p * inv_tau)


@triton.jit
def _rebase(m, M):
    """A lane's sums relative to the row maximum M instead of its own m: the factor exp(m - M), m - M."""
    u = m - M
    return tl.exp(u), u


@triton.jit
def _vgs_rows_kernel(
    zs_ptr, zsp_ptr, zt_ptr, ztp_ptr,
    stride_zs, stride_zsp, stride_zt, stride_ztp,
    coef_ptr, stats_ptr,
    gs_ptr, gsp_ptr, stride_gs, stride_gsp,
    V, V_FULL, WIDTH, inv_tau,
    HAS_GS: tl.constexpr,
    HAS_GSP: tl.constexpr,
    PRIOR_GRAD: tl.constexpr,
    TWO_STREAMS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # V: real ids of a row; V_FULL: V rounded down to BLOCK_V (unmasked blocks); WIDTH: row length
    # of the gradient buffers (columns [V, WIDTH) get gradient 0)
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_zs
    zt_row = zt_ptr + row * stride_zt
    zsp_row = zsp_ptr + row * stride_zsp
    ztp_row = ztp_ptr + row * stride_ztp
    offs0 = tl.arange(0, BLOCK_V)

    # ---------------------------------------------------------------- pass A: statistics
    m_s = tl.full([BLOCK_V], _M_INIT, tl.float32)
    m_sp = m_s
    m_t = m_s
    m_tp = m_s
    m_r = m_s
    l_s = tl.zeros([BLOCK_V], tl.float32)
    l_sp = l_s
    l_t = l_s
    l_tp = l_s
    l_r = l_s
    b_st = l_s
    b_sr = l_s
    b_sptp = l_s
    b_ttp = l_s
    for start in range(0, V_FULL, BLOCK_V):
        m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp = _stats_block(
            zs_row, zsp_row, zt_row, ztp_row, start + offs0, None, inv_tau,
            m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp,
            TWO_STREAMS, False,
        )
    if V_FULL < V:
        offs = V_FULL + offs0
        m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp = _stats_block(
            zs_row, zsp_row, zt_row, ztp_row, offs, offs < V, inv_tau,
            m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp,
            TWO_STREAMS, True,
        )

    # one reduction over the lanes: row maxima, then every lane's sums relative to them
    M_s = tl.max(m_s, 0)
    M_sp = tl.max(m_sp, 0)
    M_t = tl.max(m_t, 0)
    M_tp = tl.max(m_tp, 0)
    M_r = tl.max(m_r, 0)
    a_s, u_s = _rebase(m_s, M_s)
    a_sp, u_sp = _rebase(m_sp, M_sp)
    a_t, u_t = _rebase(m_t, M_t)
    a_tp, u_tp = _rebase(m_tp, M_tp)
    a_r, u_r = _rebase(m_r, M_r)
    # lanes that saw no entry have l = 0: their terms vanish (u is finite, about -3e38 at worst)
    S_s = tl.sum(l_s * a_s, 0)
    S_sp = tl.sum(l_sp * a_sp, 0)
    S_t = tl.sum(l_t * a_t, 0)
    S_tp = tl.sum(l_tp * a_tp, 0)
    S_r = tl.sum(l_r * a_r, 0)
    B_st = tl.sum(a_s * (b_st + l_s * (u_s - u_t)), 0)
    B_sr = tl.sum(a_s * (b_sr + l_s * (u_s - u_r)), 0)
    B_sptp = tl.sum(a_sp * (b_sptp + l_sp * (u_sp - u_tp)), 0)
    B_ttp = tl.sum(a_t * (b_ttp + l_t * (u_t - u_tp)), 0)

    g_s = tl.log(S_s)
    g_sp = tl.log(S_sp)
    g_t = tl.log(S_t)
    g_tp = tl.log(S_tp)
    g_r = tl.log(S_r)
    std = B_st / S_s - g_s + g_t
    vis = B_sr / S_s - g_s + g_r
    lang = B_sptp / S_sp - g_sp + g_tp
    vds = B_ttp / S_t - g_t + g_tp
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
        for start in range(0, V_FULL, BLOCK_V):
            _grad_block(zs_row, zsp_row, zt_row, ztp_row, gs_row, gsp_row, start + offs0, None, inv_tau,
                        M_s, M_sp, M_t, M_tp, M_r, g_s, g_sp, g_t, g_tp, g_r, std, vis, lang,
                        c_std, c_vis, c_lang, HAS_GS, HAS_GSP, PRIOR_GRAD, TWO_STREAMS, False)
        if V_FULL < V:
            offs = V_FULL + offs0
            _grad_block(zs_row, zsp_row, zt_row, ztp_row, gs_row, gsp_row, offs, offs < V, inv_tau,
                        M_s, M_sp, M_t, M_tp, M_r, g_s, g_sp, g_t, g_tp, g_r, std, vis, lang,
                        c_std, c_vis, c_lang, HAS_GS, HAS_GSP, PRIOR_GRAD, TWO_STREAMS, True)
        # padding columns [V, WIDTH): gradient 0
        for start in range(V, WIDTH, BLOCK_V):
            offs = start + offs0
            pad = offs < WIDTH
            zero = tl.zeros([BLOCK_V], tl.float32)
            if HAS_GS:
                tl.store(gs_row + offs, zero, mask=pad)
            if HAS_GSP:
                tl.store(gsp_row + offs, zero, mask=pad)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (BLOCK_V, num_warps) to use on CUDA instead of the heuristic (benchmarks sweep it); None: heuristic.
CONFIG_OVERRIDE: tuple[int, int] | None = None


def _config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): one fixed config in the interpreter, a V-based heuristic on CUDA
    (4 lanes per thread at the largest block: 14 running values per lane stay in registers)."""
    if device.type != "cuda" or _interpreting():
        return INTERPRET_BLOCK_V, 4
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    block = min(BLOCK_V_MAX, triton.next_power_of_2(max(vocab, 16)))
    return block, max(1, min(8, block // 128))


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
    vocab: int | None = None,
) -> torch.Tensor:
    """Four KLs per row ([n, 4] fp32) and optionally the logit gradients; see torch_rows."""
    if zs.dtype == torch.float64:
        return torch_rows.vgs_rows(
            zs, zsp, zt, ztp, coef, temperature=temperature,
            detach_target_prior=detach_target_prior, grad_zs=grad_zs, grad_zsp=grad_zsp, vocab=vocab,
        )
    n, width = zs.shape
    vocab = width if vocab is None else vocab
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
        elif g.dtype in _STORE_DTYPES and (g.stride(-1) == 1 or width == 1):
            outs.append(g)  # the store rounds fp32 to the buffer's dtype (in place when g is a logits tensor)
        else:  # other dtypes or layouts: through an fp32 buffer, copied back after the kernel
            outs.append(torch.empty(n, width, device=zs.device, dtype=torch.float32))
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
            vocab, vocab - vocab % block, width, 1.0 / float(temperature),
            HAS_GS=gs is not None, HAS_GSP=gsp is not None, PRIOR_GRAD=prior_grad,
            TWO_STREAMS=two, BLOCK_V=block, num_warps=warps,
        )
    for g, out in ((grad_zs, gs), (grad_zsp, gsp)):
        if g is not None and out is not g:
            g.copy_(out)
    return stats
