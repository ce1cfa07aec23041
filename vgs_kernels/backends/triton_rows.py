"""Triton row kernel: the ``triton`` backend (row contract of :mod:`vgs_kernels.backends.torch_rows`).

One program per token row streams the row's ids [0, vocab) in tiles of ``THREADS x PER_THREAD`` entries
(unmasked full tiles, then one masked tail); each thread owns ``PER_THREAD`` contiguous entries of a
tile (8 bf16 / fp16: one 16-byte load per stream); columns [vocab, width) are padding, never read. All
logits are read in log2 units (x = z * log2(e) / tau, so every exponential is one ``exp2``):

* **Pass A (statistics)** reads z_s, z_sp, z_t, z_tp once each (upcast to fp32, ``-inf`` read as
  ``NEG_LOGIT``; NaN kept) and forms the visual-target logits x_r = x_sp + x_t - x_tp in registers.
  Each thread keeps, per stream, a running maximum m over its entries so far and the sum l of
  2^(x - m), and four cross terms relative to the maxima, e.g. for std = KL(p||q)::

      B_st = sum_i 2^(x_s,i - m_s) * ((x_s,i - m_s) - (x_t,i - m_t))

  Per tile a thread takes the maximum of its own entries first (no shuffle, no shared memory), then
  one ``exp2`` per entry and stream and one per stream to rescale its sums when the maximum grew.
  After the loop one reduction over the threads re-expresses every sum relative to the row maxima M
  (B <- sum 2^(m_s - M_s) * (B + l_s * ((m_s - M_s) - (m_t - M_t)))); std = ln 2 * (B_st / l_s -
  log2 l_s + log2 l_t), and likewise vis = KL(p||r) (weights p), lang = KL(p'||q') (weights p') and
  vds = KL(q||q') (weights q). Keeping the cross terms relative to the maxima avoids cancelling large
  absolute logits (|z| ~ 1e4) against the log-sum-exps.
* **Pass B (gradients, only when ``grad_zs`` / ``grad_zsp`` are given)** re-reads the row and
  writes grad_zs = p (c_std (log p - log q - std) + c_vis (log p - log r - vis)) / tau and
  grad_zsp = (c_lang p' (log p' - log q' - lang) + c_prior (r - p)) / tau, rounded to the buffers'
  dtype (the logits' own: the driver passes the logits buffers, written in place after each
  tile's loads), and 0 on the padding columns.

Reads per row: without gradients each of the four streams is read once (4 row reads); with
gradients twice (8 row reads) plus one row write per requested gradient. Gradients need the
final log-sum-exps and KLs, so a second read is the minimum for a streaming kernel (Liger's cross
entropy does the same). When the driver's correction pass feeds the text-only pair as
``(zsp, zsp, ztp, ztp)`` (``mode="vgs"``, language term only), the kernel sees the aliasing and
reads just those two streams (2 reads, 4 with the gradient). The GEMMs around it are the driver's
(:mod:`vgs_kernels.driver`).

Compiled for sm_90 (docs/kernels.md; Triton 3.6, bf16, the pass-1 launch with both
gradients at the default 8 entries x 256 threads): 79 registers, no stack or spill bytes, about 50
instructions per logit in pass A (5.6 of them ``MUFU.EX2``) and 42 in pass B; the tests fail above 128
registers or on any stack byte. All arithmetic is fp32; fp64 inputs fall back to the torch row
function. In the interpreter (``TRITON_INTERPRET=1``, CPU tensors) one small tile is used
(``INTERPRET_TILE``); on CUDA ``cuda_config`` picks the tile from V (``CONFIG_OVERRIDE`` replaces it, for
sweeps). No autotuning, no split of a row over several programs: the driver's chunks (>= 1024 rows at
Qwen shapes) fill the GPU with one program per row.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import torch_rows

# Start value of the running maxima: below every real logit (the smallest is about -3e36 in log2 units,
# an x_r made of NEG_LOGIT terms at tau = 1e-6) yet finite, so that l_old * (m_old - m_new) is 0, not NaN.
_M_INIT = tl.constexpr(-3.0e38)
_NEG_LOGIT = tl.constexpr(-1.0e30)  # -inf logits read as this (probability 0, finite arithmetic)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tile of the vocabulary per loop step in interpreter mode: THREADS x PER_THREAD (small, so tests cover
# several tiles and the masked tail).
INTERPRET_TILE = (16, 8)
# Entries each thread handles per tile on CUDA: 8 contiguous bf16 / fp16 = one 16-byte load per stream.
PER_THREAD = 8

# Gradient buffers the kernel writes directly (other dtypes or layouts go through an fp32 buffer).
_STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_scaled(ptr, offs, mask, scale, MASKED: tl.constexpr):
    # fp32, -inf -> NEG_LOGIT (NaN stays NaN), times scale = log2(e) / tau; entries past the end of the
    # row (MASKED tiles only) read as NEG_LOGIT and are left out by _tile_update
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        x = tl.load(ptr + offs).to(tl.float32)
    return tl.maximum(x, _NEG_LOGIT, propagate_nan=tl.PropagateNan.ALL) * scale


@triton.jit
def _tile_update(m, x, mask, MASKED: tl.constexpr):
    """A thread's running maximum m [T] against its entries x [T, E]: (new maximum n, u = m - n,
    the rescale 2^u of the old sums, d = x - n, e = 2^d; masked entries get e = 0)."""
    n = tl.maximum(m, tl.max(x, 1))
    u = m - n
    d = x - n[:, None]
    e = tl.exp2(d)
    if MASKED:
        e = tl.where(mask, e, 0.0)
    return n, u, tl.exp2(u), d, e


@triton.jit
def _stats_tile(
    zs_row, zsp_row, zt_row, ztp_row, offs, mask, scale,
    m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp,
    TWO_STREAMS: tl.constexpr, MASKED: tl.constexpr,
):
    """One tile [T, E]: per thread, the online softmax of the five streams (maximum m, sum l of 2^(x - m))
    and the four KL numerators B_ab = sum e_a ((x_a - m_a) - (x_b - m_b)), relative to the thread's maxima;
    one exp per entry and stream, the rescale once per thread and tile, no reduction across threads."""
    xs = _load_scaled(zs_row, offs, mask, scale, MASKED)
    xt = _load_scaled(zt_row, offs, mask, scale, MASKED)
    if TWO_STREAMS:
        xsp = xs
        xtp = xt
    else:
        xsp = _load_scaled(zsp_row, offs, mask, scale, MASKED)
        xtp = _load_scaled(ztp_row, offs, mask, scale, MASKED)
    xr = xsp + xt - xtp
    n_s, u_s, a_s, d_s, e_s = _tile_update(m_s, xs, mask, MASKED)
    n_t, u_t, a_t, d_t, e_t = _tile_update(m_t, xt, mask, MASKED)
    n_r, u_r, a_r, d_r, e_r = _tile_update(m_r, xr, mask, MASKED)
    if TWO_STREAMS:  # sp = s and tp = t: the same state (the caller ignores the copies' KLs but the std)
        n_sp, u_sp, a_sp, d_sp, e_sp = n_s, u_s, a_s, d_s, e_s
        n_tp, u_tp, a_tp, d_tp, e_tp = n_t, u_t, a_t, d_t, e_t
    else:
        n_sp, u_sp, a_sp, d_sp, e_sp = _tile_update(m_sp, xsp, mask, MASKED)
        n_tp, u_tp, a_tp, d_tp, e_tp = _tile_update(m_tp, xtp, mask, MASKED)
    b_st = a_s * (b_st + l_s * (u_s - u_t)) + tl.sum(e_s * (d_s - d_t), 1)
    b_sr = a_s * (b_sr + l_s * (u_s - u_r)) + tl.sum(e_s * (d_s - d_r), 1)
    b_sptp = a_sp * (b_sptp + l_sp * (u_sp - u_tp)) + tl.sum(e_sp * (d_sp - d_tp), 1)
    b_ttp = a_t * (b_ttp + l_t * (u_t - u_tp)) + tl.sum(e_t * (d_t - d_tp), 1)
    l_s = l_s * a_s + tl.sum(e_s, 1)
    l_sp = l_sp * a_sp + tl.sum(e_sp, 1)
    l_t = l_t * a_t + tl.sum(e_t, 1)
    l_tp = l_tp * a_tp + tl.sum(e_tp, 1)
    l_r = l_r * a_r + tl.sum(e_r, 1)
    return n_s, n_sp, n_t, n_tp, n_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp


@triton.jit
def _grad_tile(
    zs_row, zsp_row, zt_row, ztp_row, gs_row, gsp_row, offs, mask, scale, out_scale,
    M_s, M_sp, M_t, M_tp, M_r, g_s, g_sp, g_t, g_tp, g_r, std, vis, lang, c_std, c_vis, c_lang,
    HAS_GS: tl.constexpr, HAS_GSP: tl.constexpr, PRIOR_GRAD: tl.constexpr, TWO_STREAMS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Logit gradients of one tile (log2 units: lp = log2 p; ``std`` / ``vis`` / ``lang`` in bits;
    ``out_scale`` = 1 / tau), stored in the buffers' dtype after every load of the tile (the buffers may
    be the logits themselves)."""
    if TWO_STREAMS:
        xsp = _load_scaled(zs_row, offs, mask, scale, MASKED)
        xtp = _load_scaled(zt_row, offs, mask, scale, MASKED)
        xs = xsp
        xt = xtp
    else:
        xsp = _load_scaled(zsp_row, offs, mask, scale, MASKED)
        xtp = _load_scaled(ztp_row, offs, mask, scale, MASKED)
        if HAS_GS or PRIOR_GRAD:
            xs = _load_scaled(zs_row, offs, mask, scale, MASKED)
            xt = _load_scaled(zt_row, offs, mask, scale, MASKED)
    if HAS_GS or PRIOR_GRAD:
        lp = (xs - M_s) - g_s
        p = tl.exp2(lp)
        lr = ((xsp + xt - xtp) - M_r) - g_r
    if HAS_GS:
        lq = (xt - M_t) - g_t
        grad = p * (c_std * (lp - lq - std) + c_vis * (lp - lr - vis))
        if MASKED:
            tl.store(gs_row + offs, grad * (LN2 * out_scale), mask=mask)
        else:
            tl.store(gs_row + offs, grad * (LN2 * out_scale))
    if HAS_GSP:
        lpp = (xsp - M_sp) - g_sp
        lqp = (xtp - M_tp) - g_tp
        grad_p = tl.exp2(lpp) * (c_lang * LN2 * (lpp - lqp - lang))
        if PRIOR_GRAD:
            grad_p += c_vis * (tl.exp2(lr) - p)
        if MASKED:
            tl.store(gsp_row + offs, grad_p * out_scale, mask=mask)
        else:
            tl.store(gsp_row + offs, grad_p * out_scale)


@triton.jit
def _rebase(m, M):
    """A thread's sums relative to the row maximum M instead of its own m: the factor 2^(m - M), m - M."""
    u = m - M
    return tl.exp2(u), u


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
    THREADS: tl.constexpr,
    PER_THREAD: tl.constexpr,
    TILE: tl.constexpr,  # THREADS * PER_THREAD
):
    # V: real ids of a row; V_FULL: V rounded down to the tile (unmasked tiles); WIDTH: row length of the
    # gradient buffers (columns [V, WIDTH) get gradient 0). A tile is [THREADS, PER_THREAD] entries, each
    # thread (row of the tile) PER_THREAD contiguous ones: wide loads, and per-thread reductions only.
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_zs
    zt_row = zt_ptr + row * stride_zt
    zsp_row = zsp_ptr + row * stride_zsp
    ztp_row = ztp_ptr + row * stride_ztp
    offs0 = tl.arange(0, THREADS)[:, None] * PER_THREAD + tl.arange(0, PER_THREAD)[None, :]
    scale = inv_tau * LOG2E  # logits in log2 units: 2^x instead of e^x

    # ---------------------------------------------------------------- pass A: statistics
    m_s = tl.full([THREADS], _M_INIT, tl.float32)
    m_sp = m_s
    m_t = m_s
    m_tp = m_s
    m_r = m_s
    l_s = tl.zeros([THREADS], tl.float32)
    l_sp = l_s
    l_t = l_s
    l_tp = l_s
    l_r = l_s
    b_st = l_s
    b_sr = l_s
    b_sptp = l_s
    b_ttp = l_s
    for start in range(0, V_FULL, TILE):
        m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp = _stats_tile(
            zs_row, zsp_row, zt_row, ztp_row, start + offs0, None, scale,
            m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp,
            TWO_STREAMS, False,
        )
    if V_FULL < V:
        offs = V_FULL + offs0
        m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp = _stats_tile(
            zs_row, zsp_row, zt_row, ztp_row, offs, offs < V, scale,
            m_s, m_sp, m_t, m_tp, m_r, l_s, l_sp, l_t, l_tp, l_r, b_st, b_sr, b_sptp, b_ttp,
            TWO_STREAMS, True,
        )

    # one reduction over the threads: row maxima, then every thread's sums relative to them
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
    # threads that saw no entry have l = 0: their terms vanish (u is finite, about -3e38 at worst)
    S_s = tl.sum(l_s * a_s, 0)
    S_sp = tl.sum(l_sp * a_sp, 0)
    S_t = tl.sum(l_t * a_t, 0)
    S_tp = tl.sum(l_tp * a_tp, 0)
    S_r = tl.sum(l_r * a_r, 0)
    B_st = tl.sum(a_s * (b_st + l_s * (u_s - u_t)), 0)
    B_sr = tl.sum(a_s * (b_sr + l_s * (u_s - u_r)), 0)
    B_sptp = tl.sum(a_sp * (b_sptp + l_sp * (u_sp - u_tp)), 0)
    B_ttp = tl.sum(a_t * (b_ttp + l_t * (u_t - u_tp)), 0)

    # log2-sum-exp2 and the KLs in bits; stored in nats
    g_s = tl.log2(S_s)
    g_sp = tl.log2(S_sp)
    g_t = tl.log2(S_t)
    g_tp = tl.log2(S_tp)
    g_r = tl.log2(S_r)
    std = B_st / S_s - g_s + g_t
    vis = B_sr / S_s - g_s + g_r
    lang = B_sptp / S_sp - g_sp + g_tp
    vds = B_ttp / S_t - g_t + g_tp
    stats_row = stats_ptr + row * 4
    tl.store(stats_row + 0, std * LN2)
    tl.store(stats_row + 1, vis * LN2)
    tl.store(stats_row + 2, lang * LN2)
    tl.store(stats_row + 3, vds * LN2)

    # ---------------------------------------------------------------- pass B: gradients
    if HAS_GS or HAS_GSP:
        c_std = tl.load(coef_ptr + row * 3 + 0)
        c_vis = tl.load(coef_ptr + row * 3 + 1)
        c_lang = tl.load(coef_ptr + row * 3 + 2)
        gs_row = gs_ptr + row * stride_gs
        gsp_row = gsp_ptr + row * stride_gsp
        for start in range(0, V_FULL, TILE):
            _grad_tile(zs_row, zsp_row, zt_row, ztp_row, gs_row, gsp_row, start + offs0, None, scale, inv_tau,
                       M_s, M_sp, M_t, M_tp, M_r, g_s, g_sp, g_t, g_tp, g_r, std, vis, lang,
                       c_std, c_vis, c_lang, HAS_GS, HAS_GSP, PRIOR_GRAD, TWO_STREAMS, False)
        if V_FULL < V:
            offs = V_FULL + offs0
            _grad_tile(zs_row, zsp_row, zt_row, ztp_row, gs_row, gsp_row, offs, offs < V, scale, inv_tau,
                       M_s, M_sp, M_t, M_tp, M_r, g_s, g_sp, g_t, g_tp, g_r, std, vis, lang,
                       c_std, c_vis, c_lang, HAS_GS, HAS_GSP, PRIOR_GRAD, TWO_STREAMS, True)
        # padding columns [V, WIDTH): gradient 0
        for start in range(V, WIDTH, TILE):
            offs = start + offs0
            pad = offs < WIDTH
            zero = tl.zeros([THREADS, PER_THREAD], tl.float32)
            if HAS_GS:
                tl.store(gs_row + offs, zero, mask=pad)
            if HAS_GSP:
                tl.store(gsp_row + offs, zero, mask=pad)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (THREADS, PER_THREAD, num_warps) to use on CUDA instead of ``cuda_config`` (for sweeps); None: default.
CONFIG_OVERRIDE: tuple[int, int, int] | None = None


def cuda_config(vocab: int) -> tuple[int, int, int]:
    """(THREADS, PER_THREAD, num_warps) on CUDA for rows of ``vocab`` ids: 8 warps of threads (fewer for
    short rows), 8 entries each (a 16-byte load of bf16 / fp16 per stream), a tile of up to 2048 entries."""
    per_thread = min(PER_THREAD, triton.next_power_of_2(max(vocab, 1)))
    warps = max(1, min(8, triton.next_power_of_2(max(vocab // (32 * per_thread), 1))))
    return 32 * warps, per_thread, warps


def _config(vocab: int, device: torch.device) -> tuple[int, int, int]:
    """(THREADS, PER_THREAD, num_warps): one fixed tile in the interpreter, ``cuda_config`` on CUDA."""
    if device.type != "cuda" or _interpreting():
        return (*INTERPRET_TILE, 4)
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    return cuda_config(vocab)


def _row_major(z: torch.Tensor) -> torch.Tensor:
    """A 2-D view with a contiguous last dim (the driver's views already are)."""
    return z if z.stride(-1) == 1 or z.shape[-1] <= 1 else z.contiguous()


@torch_rows.follows_row_contract
def vgs_rows(zs, zsp, zt, ztp, coef, temperature, detach_target_prior, grad_zs, grad_zsp, vocab) -> torch.Tensor:
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
    threads, per_thread, warps = _config(vocab, zs.device)
    tile = threads * per_thread
    dummy = stats  # never dereferenced when the matching HAS_* flag is off
    with torch.cuda.device(zs.device) if zs.is_cuda else contextlib.nullcontext():
        _vgs_rows_kernel[(n,)](
            zs, zsp, zt, ztp,
            zs.stride(0), zsp.stride(0), zt.stride(0), ztp.stride(0),
            coef, stats,
            gs if gs is not None else dummy, gsp if gsp is not None else dummy,
            gs.stride(0) if gs is not None else 0, gsp.stride(0) if gsp is not None else 0,
            vocab, vocab - vocab % tile, width, 1.0 / float(temperature),
            HAS_GS=gs is not None, HAS_GSP=gsp is not None, PRIOR_GRAD=prior_grad,
            TWO_STREAMS=two, THREADS=threads, PER_THREAD=per_thread, TILE=tile, num_warps=warps,
        )
    for g, out in ((grad_zs, gs), (grad_zsp, gsp)):
        if g is not None and out is not g:
            g.copy_(out)
    return stats
