// CUDA kernel of torch.ops.vgs_kernels.vgs_rows (compiled only with a CUDA build of torch and a CUDA
// toolkit; setup.py defines VGS_WITH_CUDA then). Same math as the CPU kernel (vgs_rows_cpu_kernel.h):
//
// One thread block per row. Read 1: every thread runs an online softmax over its strided share of
// the vocabulary for the five streams (s, sp, t, tp and the target r = sp + t - tp), keeping per
// stream a running maximum m and sum S = sum exp(x - m), and the four KL numerators
// A_ab = sum e_a ((x_a - m_a) - (x_b - m_b)); the per-thread states are merged with warp shuffles and
// then across warps through shared memory; thread 0 turns them into the four KLs
// (KL(a||b) = A_ab / S_a - (log S_a - log S_b)). Read 2 (only when gradients are requested): every
// thread writes the logit gradients of its entries. fp32 math (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "vgs_common.h"

namespace vgs {
namespace {

constexpr int kGroup = 4;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}  // entries per thread per step (independent loads in flight)

__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

// Streams: 0 = s, 1 = sp, 2 = t, 3 = tp, 4 = r. A: (s,t), (s,r), (sp,tp), (t,tp).
template <typename acc_t>
struct State {
  acc_t m[5];
  acc_t S[5];
  acc_t A[4];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      m[k] = neg_inf<acc_t>();
      S[k] = 0;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) A[k] = 0;
  }
  __device__ __forceinline__ bool empty() const { return m[0] == neg_inf<acc_t>(); }

  // Re-express the sums relative to new maxima mn >= m (no-op for an empty state but the maxima).
  __device__ __forceinline__ void rebase(const acc_t (&mn)[5]) {
    if (!empty()) {
      acc_t d[5], sc[5];
#pragma unroll
      for (int k = 0; k < 5; ++k) {
        d[k] = mn[k] - m[k];
        sc[k] = d[k] == acc_t(0) ? acc_t(1) : dexp(-d[k]);
      }
      A[0] = sc[0] * (A[0] + (d[2] - d[0]) * S[0]);
      A[1] = sc[0] * (A[1] + (d[4] - d[0]) * S[0]);
      A[2] = sc[1] * (A[2] + (d[3] - d[1]) * S[1]);
      A[3] = sc[2] * (A[3] + (d[3] - d[2]) * S[2]);
#pragma unroll
      for (int k = 0; k < 5; ++k) S[k] *= sc[k];
    }
#pragma unroll
    for (int k = 0; k < 5; ++k) m[k] = mn[k];
  }

  __device__ __forceinline__ void merge(State o) {
    if (o.empty()) return;
    if (empty()) {
      *this = o;
      return;
    }
    acc_t mn[5];
#pragma unroll
    for (int k = 0; k < 5; ++k) mn[k] = m[k] > o.m[k] ? m[k] : o.m[k];
    rebase(mn);
    o.rebase(mn);
#pragma unroll
    for (int k = 0; k < 5; ++k) S[k] += o.S[k];
#pragma unroll
    for (int k = 0; k < 4; ++k) A[k] += o.A[k];
  }

  __device__ __forceinline__ void shfl_merge(int offset) {
    State o;
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      o.m[k] = __shfl_xor_sync(0xffffffffu, m[k], offset);
      o.S[k] = __shfl_xor_sync(0xffffffffu, S[k], offset);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) o.A[k] = __shfl_xor_sync(0xffffffffu, A[k], offset);
    merge(o);
  }
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_scaled(const scalar_t* p, int64_t j, acc_t inv_tau) {
  acc_t x = static_cast<acc_t>(p[j]);
  x = x < acc_t(kNegLogit) ? acc_t(kNegLogit) : x;
  return x * inv_tau;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(1024) vgs_rows_kernel(
    const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zsp, const scalar_t* __restrict__ zt,
    const scalar_t* __restrict__ ztp, int64_t st_s, int64_t st_sp, int64_t st_t, int64_t st_tp,
    const float* __restrict__ coef, acc_t* __restrict__ gs, int64_t gs_stride, acc_t* __restrict__ gsp,
    int64_t gsp_stride, float* __restrict__ stats, int64_t V, acc_t inv_tau, bool detach) {
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const scalar_t* ps = zs + row * st_s;
  const scalar_t* psp = zsp + row * st_sp;
  const scalar_t* pt = zt + row * st_t;
  const scalar_t* ptp = ztp + row * st_tp;

  // ---- read 1: per-thread online softmax over groups of kGroup entries ----
  State<acc_t> st;
  st.clear();
  for (int64_t base = tid; base < V; base += int64_t(nthreads) * kGroup) {
    acc_t x[5][kGroup];
    acc_t gm[5];
#pragma unroll
    for (int k = 0; k < 5; ++k) gm[k] = neg_inf<acc_t>();
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int64_t j = base + int64_t(g) * nthreads;
      if (j < V) {
        x[0][g] = load_scaled(ps, j, inv_tau);
        x[1][g] = load_scaled(psp, j, inv_tau);
        x[2][g] = load_scaled(pt, j, inv_tau);
        x[3][g] = load_scaled(ptp, j, inv_tau);
        x[4][g] = (x[1][g] + x[2][g]) - x[3][g];
#pragma unroll
        for (int k = 0; k < 5; ++k) gm[k] = x[k][g] > gm[k] ? x[k][g] : gm[k];
      }
    }
    acc_t mn[5];
#pragma unroll
    for (int k = 0; k < 5; ++k) mn[k] = gm[k] > st.m[k] ? gm[k] : st.m[k];
    st.rebase(mn);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int64_t j = base + int64_t(g) * nthreads;
      if (j < V) {
        acc_t y[5], e[5];
#pragma unroll
        for (int k = 0; k < 5; ++k) {
          y[k] = x[k][g] - st.m[k];
          e[k] = dexp(y[k]);
          st.S[k] += e[k];
        }
        st.A[0] += e[0] * (y[0] - y[2]);
        st.A[1] += e[0] * (y[0] - y[4]);
        st.A[2] += e[1] * (y[1] - y[3]);
        st.A[3] += e[2] * (y[2] - y[3]);
      }
    }
  }

  // ---- merge: within warps, then across warps ----
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st.shfl_merge(off);
  __shared__ State<acc_t> warp_states[32];
  __shared__ acc_t row_m[5], row_logS[5], row_kl[3];
  const int warp = tid >> 5, lane = tid & 31, nwarps = (nthreads + 31) >> 5;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    if (lane < nwarps) {
      st = warp_states[lane];
    } else {
      st.clear();
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st.shfl_merge(off);
    if (lane == 0) {
      acc_t logS[5];
#pragma unroll
      for (int k = 0; k < 5; ++k) {
        logS[k] = dlog(st.S[k]);
        row_m[k] = st.m[k];
        row_logS[k] = logS[k];
      }
      const acc_t std_kl = st.A[0] / st.S[0] - (logS[0] - logS[2]);
      const acc_t vis_kl = st.A[1] / st.S[0] - (logS[0] - logS[4]);
      const acc_t lang_kl = st.A[2] / st.S[1] - (logS[1] - logS[3]);
      const acc_t vds_kl = st.A[3] / st.S[2] - (logS[2] - logS[3]);
      float* out = stats + row * 4;
      out[0] = float(std_kl);
      out[1] = float(vis_kl);
      out[2] = float(lang_kl);
      out[3] = float(vds_kl);
      row_kl[0] = std_kl;
      row_kl[1] = vis_kl;
      row_kl[2] = lang_kl;
    }
  }
  if (gs == nullptr && gsp == nullptr) return;
  __syncthreads();

  // ---- read 2: gradients ----
  const acc_t c_std = coef[row * 3 + 0], c_vis = coef[row * 3 + 1], c_lang = coef[row * 3 + 2];
  const acc_t c_prior = detach ? acc_t(0) : c_vis;
  acc_t* g_s = gs ? gs + row * gs_stride : nullptr;
  acc_t* g_sp = gsp ? gsp + row * gsp_stride : nullptr;
  const bool do_gs = g_s && (c_std != acc_t(0) || c_vis != acc_t(0));
  const bool do_gsp = g_sp && (c_lang != acc_t(0) || c_prior != acc_t(0));
  const acc_t m0 = row_m[0], m1 = row_m[1], m2 = row_m[2], m3 = row_m[3], m4 = row_m[4];
  const acc_t l0 = row_logS[0], l1 = row_logS[1], l2 = row_logS[2], l3 = row_logS[3], l4 = row_logS[4];
  const acc_t kstd = row_kl[0], kvis = row_kl[1], klang = row_kl[2];
  const acc_t cs = c_std * inv_tau, cv = c_vis * inv_tau, cl = c_lang * inv_tau, cp = c_prior * inv_tau;
  for (int64_t j = tid; j < V; j += nthreads) {
    if (!do_gs && !do_gsp) {
      if (g_s) g_s[j] = acc_t(0);
      if (g_sp) g_sp[j] = acc_t(0);
      continue;
    }
    const acc_t xs = load_scaled(ps, j, inv_tau), xsp = load_scaled(psp, j, inv_tau);
    const acc_t xt = load_scaled(pt, j, inv_tau), xtp = load_scaled(ptp, j, inv_tau);
    const acc_t ls = (xs - m0) - l0, lsp = (xsp - m1) - l1, lt = (xt - m2) - l2, ltp = (xtp - m3) - l3;
    const acc_t lr = (((xsp + xt) - xtp) - m4) - l4;
    const acc_t p = dexp(ls);
    if (g_s) {
      acc_t g = 0;
      if (do_gs) {
        if (c_std != acc_t(0)) g += cs * (ls - lt - kstd);
        if (c_vis != acc_t(0)) g += cv * (ls - lr - kvis);
        g *= p;
      }
      g_s[j] = g;
    }
    if (g_sp) {
      acc_t g = 0;
      if (do_gsp) {
        if (c_lang != acc_t(0)) g += dexp(lsp) * (cl * (lsp - ltp - klang));
        if (c_prior != acc_t(0)) g += cp * (dexp(lr) - p);
      }
      g_sp[j] = g;
    }
  }
}

int threads_for(int64_t V) {
  int t = 32;
  while (t < 1024 && int64_t(t) * 16 < V) t <<= 1;
  return t;
}

at::Tensor vgs_rows_cuda(const at::Tensor& zs, const at::Tensor& zsp, const at::Tensor& zt, const at::Tensor& ztp,
                         const at::Tensor& coef, double temperature, bool detach_target_prior,
                         const std::optional<at::Tensor>& grad_zs, const std::optional<at::Tensor>& grad_zsp) {
  TORCH_CHECK(zs.is_cuda(), "vgs_rows (CUDA kernel): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(zs.device());
  Prepared p = prepare(zs, zsp, zt, ztp, coef, temperature, grad_zs, grad_zsp);
  for (const at::Tensor* g : {&p.gs, &p.gsp})
    TORCH_CHECK(!g->defined() || g->device() == zs.device(), "vgs_rows: gradient buffers must be on ", zs.device());
  TORCH_CHECK(p.n < (int64_t(1) << 31), "vgs_rows: too many rows for one launch");
  if (p.n > 0) {
    const int threads = threads_for(p.V);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.z[0].scalar_type(), "vgs_rows_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      vgs_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(p.n), threads, 0, stream>>>(
          p.z[0].const_data_ptr<scalar_t>(), p.z[1].const_data_ptr<scalar_t>(), p.z[2].const_data_ptr<scalar_t>(),
          p.z[3].const_data_ptr<scalar_t>(), p.z[0].stride(0), p.z[1].stride(0), p.z[2].stride(0),
          p.z[3].stride(0), p.coef.const_data_ptr<float>(),
          p.gs.defined() ? p.gs.mutable_data_ptr<acc_t>() : nullptr, p.gs.defined() ? p.gs.stride(0) : 0,
          p.gsp.defined() ? p.gsp.mutable_data_ptr<acc_t>() : nullptr, p.gsp.defined() ? p.gsp.stride(0) : 0,
          p.stats.mutable_data_ptr<float>(), p.V, static_cast<acc_t>(1.0 / temperature), detach_target_prior);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish(p);
  return p.stats;
}

}  // namespace
}  // namespace vgs

TORCH_LIBRARY_IMPL(vgs_kernels, CUDA, m) { m.impl("vgs_rows", &vgs::vgs_rows_cuda); }
