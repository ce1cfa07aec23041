// CUDA kernel of torch.ops.vgs_kernels.vgs_rows (compiled only with a CUDA build of torch and a CUDA
// toolkit; setup.py defines VGS_WITH_CUDA then). Same math as the CPU kernel (vgs_rows_cpu_kernel.h):
//
// One thread block per row (kThreads threads, several blocks per SM). Read 1: every thread runs an
// online softmax over its share of the row's ids [0, vocab) for the five streams (s, sp, t, tp and
// the target r = sp + t - tp), VEC contiguous entries at a time (one 16-byte load per stream when
// the rows are 16-byte aligned, else one entry), keeping per stream a running maximum m and sum
// S = sum exp(x - m), and the four KL numerators A_ab = sum e_a ((x_a - m_a) - (x_b - m_b)); the
// per-thread states are merged with warp shuffles and then across warps through shared memory; one
// thread turns them into the four KLs (KL(a||b) = A_ab / S_a - (log S_a - log S_b)). Read 2 (only
// when gradients are requested): every thread reads its entries again and writes their gradients
// in the gradient buffers' dtype (the logits' own dtype, or fp32), VEC at a time, after its loads:
// a gradient buffer may be the logits themselves. Padding columns [vocab, width) get gradient 0.
// fp32 math (fp64 for fp64 inputs).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vgs_rows_cuda.h"

namespace vgs {
namespace {

// A finite stand-in for -inf logits (torch_rows.NEG_LOGIT, vgs_common.h's kNegLogit).
constexpr double kNegLogit = -1.0e30;
constexpr int kThreads = 256;  // per block
// Blocks per SM the register budget must allow (<= 85 registers per thread at 3): fp32 math keeps
// 3 (24 warps per SM, enough 16-byte loads in flight to stream from HBM); fp64 (not a speed target)
// gets the registers of 1, so neither spills.
template <typename acc_t>
constexpr int kMinBlocks = std::is_same_v<acc_t, double> ? 1 : 3;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

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

  // Add N entries x[stream][i] (their maxima first, then one exp per entry and stream).
  template <int N>
  __device__ __forceinline__ void add(const acc_t (&x)[5][N]) {
    acc_t mn[5];
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      mn[k] = m[k];
#pragma unroll
      for (int i = 0; i < N; ++i) mn[k] = x[k][i] > mn[k] ? x[k][i] : mn[k];
    }
    rebase(mn);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      acc_t y[5], e[5];
#pragma unroll
      for (int k = 0; k < 5; ++k) {
        y[k] = x[k][i] - m[k];
        e[k] = dexp(y[k]);
        S[k] += e[k];
      }
      A[0] += e[0] * (y[0] - y[2]);
      A[1] += e[0] * (y[0] - y[4]);
      A[2] += e[1] * (y[1] - y[3]);
      A[3] += e[2] * (y[2] - y[3]);
    }
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

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// x[i] = max(p[j + i], NEG_LOGIT) * inv_tau for i < N; one vector load when N > 1 (the caller
// guarantees 16-byte alignment then).
template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_scaled(const scalar_t* p, int64_t j, acc_t inv_tau, acc_t (&x)[N]) {
  if constexpr (N == 1) {
    x[0] = static_cast<acc_t>(p[j]);
  } else {
    const Pack<scalar_t, N> v = *reinterpret_cast<const Pack<scalar_t, N>*>(p + j);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = static_cast<acc_t>(v.v[i]);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const acc_t y = x[i] < acc_t(kNegLogit) ? acc_t(kNegLogit) : x[i];
    x[i] = y * inv_tau;
  }
}

// p[j + i] = g[i] in out_t; 16-byte stores where the pack fits in 16 bytes (alignment checked by
// the caller when N > 1), else one entry at a time.
template <int N, typename out_t, typename acc_t>
__device__ __forceinline__ void store(out_t* p, int64_t j, const acc_t (&g)[N]) {
  if constexpr (N > 1 && sizeof(out_t) * N <= 16) {
    Pack<out_t, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = static_cast<out_t>(g[i]);
    *reinterpret_cast<Pack<out_t, N>*>(p + j) = v;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[j + i] = static_cast<out_t>(g[i]);
  }
}

template <typename acc_t>
struct RowStats {
  acc_t m[5], logS[5], kl[3];
};

template <typename scalar_t>
struct Rows {
  const scalar_t* p[4];  // this row of zs, zsp, zt, ztp (zs == zsp and zt == ztp are allowed)
};

// N entries of all four streams at j (+ the target r).
template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_all(const Rows<scalar_t>& r, int64_t j, acc_t inv_tau,
                                         acc_t (&x)[5][N]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) load_scaled<N>(r.p[k], j, inv_tau, x[k]);
#pragma unroll
  for (int i = 0; i < N; ++i) x[4][i] = (x[1][i] + x[2][i]) - x[3][i];
}

// Gradients of N entries at j, written after the loads (the buffers may be the logits).
template <int N, typename scalar_t, typename acc_t, typename out_t>
__device__ __forceinline__ void grad_entries(const Rows<scalar_t>& r, int64_t j, acc_t inv_tau,
                                             const RowStats<acc_t>& rs, out_t* g_s, out_t* g_sp, bool do_gs,
                                             bool do_gsp, acc_t cs, acc_t cv, acc_t cl, acc_t cp) {
  acc_t gs[N], gsp[N];
  if (do_gs || do_gsp) {
    acc_t x[5][N];
    load_all<N>(r, j, inv_tau, x);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const acc_t ls = (x[0][i] - rs.m[0]) - rs.logS[0], lsp = (x[1][i] - rs.m[1]) - rs.logS[1];
      const acc_t lt = (x[2][i] - rs.m[2]) - rs.logS[2], ltp = (x[3][i] - rs.m[3]) - rs.logS[3];
      const acc_t lr = (x[4][i] - rs.m[4]) - rs.logS[4];
      const acc_t p = dexp(ls);
      acc_t g = 0;
      if (do_gs) {
        if (cs != acc_t(0)) g += cs * (ls - lt - rs.kl[0]);
        if (cv != acc_t(0)) g += cv * (ls - lr - rs.kl[1]);
        g *= p;
      }
      gs[i] = g;
      acc_t h = 0;
      if (do_gsp) {
        if (cl != acc_t(0)) h += dexp(lsp) * (cl * (lsp - ltp - rs.kl[2]));
        if (cp != acc_t(0)) h += cp * (dexp(lr) - p);
      }
      gsp[i] = h;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) gs[i] = gsp[i] = 0;
  }
  if (g_s) store<N>(g_s, j, gs);
  if (g_sp) store<N>(g_sp, j, gsp);
}

template <typename scalar_t, typename acc_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t>) vgs_rows_kernel(
    const scalar_t* zs, const scalar_t* zsp, const scalar_t* zt, const scalar_t* ztp, int64_t st_s, int64_t st_sp,
    int64_t st_t, int64_t st_tp, const float* __restrict__ coef, out_t* gs, int64_t gs_stride, out_t* gsp,
    int64_t gsp_stride, float* __restrict__ stats, int64_t vocab, int64_t width, acc_t inv_tau, bool detach) {
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  Rows<scalar_t> r;
  r.p[0] = zs + row * st_s;
  r.p[1] = zsp + row * st_sp;
  r.p[2] = zt + row * st_t;
  r.p[3] = ztp + row * st_tp;
  const int64_t vec_end = vocab - vocab % VEC;  // [0, vec_end) in packs of VEC, then single entries

  // ---- read 1: per-thread online softmax ----
  State<acc_t> st;
  st.clear();
  for (int64_t j = int64_t(tid) * VEC; j < vec_end; j += int64_t(kThreads) * VEC) {
    acc_t x[5][VEC];
    load_all<VEC>(r, j, inv_tau, x);
    st.add<VEC>(x);
  }
  for (int64_t j = vec_end + tid; j < vocab; j += kThreads) {
    acc_t x[5][1];
    load_all<1>(r, j, inv_tau, x);
    st.add<1>(x);
  }

  // ---- merge: within warps, then across warps ----
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st.shfl_merge(off);
  constexpr int kWarps = kThreads / 32;
  __shared__ State<acc_t> warp_states[kWarps];
  __shared__ RowStats<acc_t> rs_shared;
  const int warp = tid >> 5, lane = tid & 31;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    if (lane < kWarps) {
      st = warp_states[lane];
    } else {
      st.clear();
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st.shfl_merge(off);
    if (lane == 0) {
      RowStats<acc_t> rs;
#pragma unroll
      for (int k = 0; k < 5; ++k) {
        rs.m[k] = st.m[k];
        rs.logS[k] = dlog(st.S[k]);
      }
      const acc_t std_kl = st.A[0] / st.S[0] - (rs.logS[0] - rs.logS[2]);
      const acc_t vis_kl = st.A[1] / st.S[0] - (rs.logS[0] - rs.logS[4]);
      const acc_t lang_kl = st.A[2] / st.S[1] - (rs.logS[1] - rs.logS[3]);
      const acc_t vds_kl = st.A[3] / st.S[2] - (rs.logS[2] - rs.logS[3]);
      float* out = stats + row * 4;
      out[0] = float(std_kl);
      out[1] = float(vis_kl);
      out[2] = float(lang_kl);
      out[3] = float(vds_kl);
      rs.kl[0] = std_kl;
      rs.kl[1] = vis_kl;
      rs.kl[2] = lang_kl;
      rs_shared = rs;
    }
  }
  if (gs == nullptr && gsp == nullptr) return;
  __syncthreads();

  // ---- read 2: gradients ----
  const RowStats<acc_t> rs = rs_shared;
  const acc_t c_std = coef[row * 3 + 0], c_vis = coef[row * 3 + 1], c_lang = coef[row * 3 + 2];
  const acc_t c_prior = detach ? acc_t(0) : c_vis;
  out_t* g_s = gs ? gs + row * gs_stride : nullptr;
  out_t* g_sp = gsp ? gsp + row * gsp_stride : nullptr;
  const bool do_gs = g_s && (c_std != acc_t(0) || c_vis != acc_t(0));
  const bool do_gsp = g_sp && (c_lang != acc_t(0) || c_prior != acc_t(0));
  const acc_t cs = c_std * inv_tau, cv = c_vis * inv_tau, cl = c_lang * inv_tau, cp = c_prior * inv_tau;
  for (int64_t j = int64_t(tid) * VEC; j < vec_end; j += int64_t(kThreads) * VEC)
    grad_entries<VEC>(r, j, inv_tau, rs, g_s, g_sp, do_gs, do_gsp, cs, cv, cl, cp);
  for (int64_t j = vec_end + tid; j < vocab; j += kThreads)
    grad_entries<1>(r, j, inv_tau, rs, g_s, g_sp, do_gs, do_gsp, cs, cv, cl, cp);
  for (int64_t j = vocab + tid; j < width; j += kThreads) {  // padding columns
    if (g_s) g_s[j] = out_t(0);
    if (g_sp) g_sp[j] = out_t(0);
  }
}

bool aligned16(const void* p, int64_t stride_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride_bytes % 16 == 0;
}

template <typename T>
struct MathType {
  using type = float;
};
template <>
struct MathType<double> {
  using type = double;
};

template <typename scalar_t, typename out_t>
void launch(const CudaRowsArgs& a, cudaStream_t stream) {
  using acc_t = typename MathType<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const scalar_t* z[4];
  bool vec_ok = true;
  for (int k = 0; k < 4; ++k) {
    z[k] = static_cast<const scalar_t*>(a.z[k]);
    vec_ok = vec_ok && aligned16(z[k], a.z_stride[k] * int64_t(sizeof(scalar_t)));
  }
  out_t* g[2] = {static_cast<out_t*>(a.gs), static_cast<out_t*>(a.gsp)};
  const int64_t g_stride[2] = {a.gs_stride, a.gsp_stride};
  for (int k = 0; k < 2; ++k) {
    // a pack of kVec gradients is stored at once only when it fits 16 bytes
    if (g[k] && sizeof(out_t) * kVec <= 16) vec_ok = vec_ok && aligned16(g[k], g_stride[k] * int64_t(sizeof(out_t)));
  }
  const acc_t inv_tau = static_cast<acc_t>(1.0 / a.temperature);
  const dim3 grid(static_cast<unsigned>(a.n)), block(kThreads);
#define VGS_LAUNCH(VEC)                                                                                         \
  vgs_rows_kernel<scalar_t, acc_t, out_t, VEC><<<grid, block, 0, stream>>>(                                     \
      z[0], z[1], z[2], z[3], a.z_stride[0], a.z_stride[1], a.z_stride[2], a.z_stride[3], a.coef, g[0],         \
      g_stride[0], g[1], g_stride[1], a.stats, a.vocab, a.width, inv_tau, a.detach)
  if (vec_ok) {
    VGS_LAUNCH(kVec);
  } else {
    VGS_LAUNCH(1);
  }
#undef VGS_LAUNCH
}

template <typename scalar_t>
void launch_out(const CudaRowsArgs& a, CudaDtype out, cudaStream_t stream) {
  if (out == CudaDtype::kFloat || out == CudaDtype::kDouble) {
    launch<scalar_t, typename MathType<scalar_t>::type>(a, stream);
  } else {
    launch<scalar_t, scalar_t>(a, stream);
  }
}

}  // namespace

void launch_vgs_rows_cuda(const CudaRowsArgs& a, CudaDtype in, CudaDtype out, void* stream) {
  if (a.n == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (in) {
    case CudaDtype::kFloat:
      launch<float, float>(a, s);
      break;
    case CudaDtype::kDouble:
      launch<double, double>(a, s);
      break;
    case CudaDtype::kHalf:
      launch_out<c10::Half>(a, out, s);
      break;
    case CudaDtype::kBFloat16:
      launch_out<c10::BFloat16>(a, out, s);
      break;
  }
}

}  // namespace vgs
