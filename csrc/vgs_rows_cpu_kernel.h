// The CPU row kernel. NO include guard on purpose: vgs_rows_cpu.cpp includes this file once per
// instruction set (AVX-512, AVX2, baseline), each time inside `#pragma GCC target(...)` and with
// VGS_ISA_NS naming the namespace, and picks one at run time. The loops are plain C++ written for
// the auto-vectoriser (`#pragma omp simd` for the reductions, a branch-free polynomial exp).
//
// Per row, two reads of the four logit rows, in blocks of kBlock entries that stay in L1:
//   1. block maxima, then exp-sums relative to a running maximum m (rescaled when it grows) for the
//      five streams s, sp, t, tp and the target r = sp + t - tp, plus the four sums that give the
//      KLs, A_ab = sum_j e_a (y_a - y_b) with y = x - m, for (a, b) = (s, t), (s, r), (sp, tp), (t, tp):
//      KL(a || b) = A_ab / S_a - (log S_a - log S_b), exact 0 for identical rows.
//      When the text-only pair is the image pair itself (same pointers: standard mode without the text
//      view, the language term alone) only s, t and r are computed and sp, tp copied from them.
//   2. (only when gradients are requested) log-probabilities from the five (max, log-sum) pairs and
//      the gradients written straight into the output rows, each block after its loads (an output
//      row may be the logits row itself); padding columns [vocab, V) get gradient 0.
#ifndef VGS_ISA_NS
#error "define VGS_ISA_NS before including vgs_rows_cpu_kernel.h"
#endif

namespace vgs {
namespace VGS_ISA_NS {

constexpr int64_t kBlock = 1024;

// exp for x <= 0 (arguments are differences from a maximum): Cody-Waite reduction + the Cephes
// degree-6 polynomial (~1 ulp), and 2^n applied as two factors so that results underflow to 0
// gradually like expf; x is clamped to -170 (exp(-170) = 0 in fp32; -1e30 stand-ins give 0).
// Branch-free, so the loops that call it vectorise.
static inline float fexp(float x) {
  x = x < -170.0f ? -170.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) via the 1.5*2^23 trick
  const float nf = t - 12582912.0f;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const int32_t n = ti - 0x4B400000;
  float r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t k1 = n >> 1, k2 = n - k1;  // both in [-126, 64]
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float f1, f2;
  std::memcpy(&f1, &b1, 4);
  std::memcpy(&f2, &b2, 4);
  return (y * f1) * f2;
}
static inline double fexp(double x) { return std::exp(x); }

static inline float load1(const float* p, int64_t j) { return p[j]; }
static inline double load1(const double* p, int64_t j) { return p[j]; }
static inline float load1(const BF16Bits* p, int64_t j) {
  const uint32_t b = uint32_t(p[j].x) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
static inline float load1(const HalfBits* p, int64_t j) { return c10::detail::fp16_ieee_to_fp32_value(p[j].x); }

// dst[j] = max(src[j], NEG_LOGIT) * inv_tau in the accumulation type.
template <typename in_t, typename acc_t>
static inline void load_block(const in_t* __restrict src, acc_t* __restrict dst, int64_t n, acc_t inv_tau) {
  const acc_t neg = acc_t(kNegLogit);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc_t x = load1(src, j);
    x = x < neg ? neg : x;
    dst[j] = x * inv_tau;
  }
}

template <typename acc_t>
static inline void target_block(const acc_t* __restrict xsp, const acc_t* __restrict xt,
                                const acc_t* __restrict xtp, acc_t* __restrict xr, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) xr[j] = (xsp[j] + xt[j]) - xtp[j];
}

template <typename acc_t>
static inline acc_t block_max(const acc_t* __restrict x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename acc_t>
static inline void to_logp(acc_t* __restrict x, int64_t n, acc_t m, acc_t log_sum) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = (x[j] - m) - log_sum;
}

template <typename acc_t>
static inline void exp_block(const acc_t* __restrict x, acc_t* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = fexp(x[j]);
}

// Streams: 0 = s, 1 = sp, 2 = t, 3 = tp, 4 = r.
template <typename in_t, typename acc_t>
static void rows(const RowsArgs& a, int64_t begin, int64_t end) {
  alignas(64) acc_t buf[5][kBlock];
  alignas(64) acc_t pbuf[2][kBlock];
  acc_t* __restrict xs = buf[0];
  acc_t* __restrict xsp = buf[1];
  acc_t* __restrict xt = buf[2];
  acc_t* __restrict xtp = buf[3];
  acc_t* __restrict xr = buf[4];
  const int64_t V = a.vocab;  // the loops see the real ids only
  const int64_t width = a.V;
  const acc_t inv_tau = acc_t(1.0 / a.temperature);
  const acc_t inf = std::numeric_limits<acc_t>::infinity();

  // The text-only pair passed as the image pair itself (standard mode without the text view, the language
  // term alone in the driver's correction pass): s = sp and t = tp, so only s, t and r are computed.
  const bool two = a.z[0] == a.z[1] && a.z_stride[0] == a.z_stride[1] && a.z[2] == a.z[3] &&
                   a.z_stride[2] == a.z_stride[3];
  const acc_t* sp_blk = two ? xs : xsp;  // where the sp / tp logits of a block are (aliases in `two`)
  const acc_t* tp_blk = two ? xt : xtp;

  for (int64_t row = begin; row < end; ++row) {
    const in_t* z[4];
    for (int k = 0; k < 4; ++k) z[k] = static_cast<const in_t*>(a.z[k]) + row * a.z_stride[k];

    // ---- pass 1: five online log-sum-exps and the four KL numerators ----
    acc_t m[5] = {-inf, -inf, -inf, -inf, -inf};
    double S[5] = {0, 0, 0, 0, 0};
    double A[4] = {0, 0, 0, 0};  // s-t, s-r (scaled with s), sp-tp (sp), t-tp (t)
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t n = std::min(kBlock, V - j0);
      load_block(z[0] + j0, xs, n, inv_tau);
      load_block(z[2] + j0, xt, n, inv_tau);
      if (!two) {
        load_block(z[1] + j0, xsp, n, inv_tau);
        load_block(z[3] + j0, xtp, n, inv_tau);
      }
      target_block(sp_blk, xt, tp_blk, xr, n);
      // New running maxima; the sums are relative to them, so rescale (and shift the A's).
      double d[5];
      for (int k = 0; k < 5; ++k) {
        const acc_t bm = two && (k == 1 || k == 3) ? m[k - 1] : block_max(buf[k], n);
        const acc_t mn = bm > m[k] ? bm : m[k];
        d[k] = j0 == 0 ? 0.0 : double(mn) - double(m[k]);
        m[k] = mn;
      }
      if (j0 > 0) {
        double sc[5];
        for (int k = 0; k < 5; ++k) sc[k] = d[k] == 0.0 ? 1.0 : std::exp(-d[k]);
        A[0] = sc[0] * (A[0] + (d[2] - d[0]) * S[0]);
        A[1] = sc[0] * (A[1] + (d[4] - d[0]) * S[0]);
        A[2] = sc[1] * (A[2] + (d[3] - d[1]) * S[1]);
        A[3] = sc[2] * (A[3] + (d[3] - d[2]) * S[2]);
        for (int k = 0; k < 5; ++k) S[k] *= sc[k];
      }
      const acc_t m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3], m4 = m[4];
      // One loop per stream: few reductions each, so every ISA variant vectorises them.
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : s0, a0, a1)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t ys = xs[j] - m0;
        const acc_t e = fexp(ys);
        s0 += e;
        a0 += e * (ys - (xt[j] - m2));
        a1 += e * (ys - (xr[j] - m4));
      }
#pragma omp simd reduction(+ : s2, a3)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t yt = xt[j] - m2;
        const acc_t e = fexp(yt);
        s2 += e;
        a3 += e * (yt - (tp_blk[j] - m3));
      }
      if (two) {  // sp = s and tp = t: the same sums, computed once
        s1 = s0;
        a2 = a0;
        s3 = s2;
      } else {
#pragma omp simd reduction(+ : s1, a2)
        for (int64_t j = 0; j < n; ++j) {
          const acc_t ysp = xsp[j] - m1;
          const acc_t e = fexp(ysp);
          s1 += e;
          a2 += e * (ysp - (xtp[j] - m3));
        }
#pragma omp simd reduction(+ : s3)
        for (int64_t j = 0; j < n; ++j) s3 += fexp(xtp[j] - m3);
      }
#pragma omp simd reduction(+ : s4)
      for (int64_t j = 0; j < n; ++j) s4 += fexp(xr[j] - m4);
      S[0] += s0;
      S[1] += s1;
      S[2] += s2;
      S[3] += s3;
      S[4] += s4;
      A[0] += a0;
      A[1] += a1;
      A[2] += a2;
      A[3] += a3;
    }
    double logS[5];
    for (int k = 0; k < 5; ++k) logS[k] = std::log(S[k]);
    // KL(a || b) = E_a[(x_a - m_a) - (x_b - m_b)] - (log S_a - log S_b)
    const double std_kl = A[0] / S[0] - (logS[0] - logS[2]);
    const double vis_kl = A[1] / S[0] - (logS[0] - logS[4]);
    const double lang_kl = A[2] / S[1] - (logS[1] - logS[3]);
    const double vds_kl = A[3] / S[2] - (logS[2] - logS[3]);
    float* st = a.stats + row * 4;
    st[0] = float(std_kl);
    st[1] = float(vis_kl);
    st[2] = float(lang_kl);
    st[3] = float(vds_kl);

    // ---- pass 2: gradients ----
    const float* c = a.coef + row * 3;
    const acc_t c_std = c[0], c_vis = c[1], c_lang = c[2];
    const acc_t c_prior = a.detach ? acc_t(0) : c_vis;
    acc_t* gs = a.gs ? static_cast<acc_t*>(a.gs) + row * a.gs_stride : nullptr;
    acc_t* gsp = a.gsp ? static_cast<acc_t*>(a.gsp) + row * a.gsp_stride : nullptr;
    const bool do_gs = gs && (c_std != 0 || c_vis != 0);
    const bool do_gsp = gsp && (c_lang != 0 || c_prior != 0);
    // zeros where no gradient is computed: the padding, and whole rows with zero coefficients (after
    // the loop below, which may still read a logits row that is also a gradient row)
    if (gs) std::fill(gs + V, gs + width, acc_t(0));
    if (gsp) std::fill(gsp + V, gsp + width, acc_t(0));
    if (!do_gs && !do_gsp) {
      if (gs) std::fill(gs, gs + V, acc_t(0));
      if (gsp) std::fill(gsp, gsp + V, acc_t(0));
      continue;
    }
    const bool need_r = (do_gs && c_vis != 0) || (do_gsp && c_prior != 0);
    const bool need_s = do_gs || (do_gsp && c_prior != 0);
    const bool need_sp = need_r || do_gsp;
    const bool need_t = need_r || (do_gs && c_std != 0);
    const bool need_tp = need_r || do_gsp;
    // log-prob of stream k: (x - m_k) - log S_k
    const acc_t m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3], m4 = m[4];
    const acc_t l0 = acc_t(logS[0]), l1 = acc_t(logS[1]), l2 = acc_t(logS[2]), l3 = acc_t(logS[3]),
                l4 = acc_t(logS[4]);
    const acc_t kstd = acc_t(std_kl), kvis = acc_t(vis_kl), klang = acc_t(lang_kl);
    const acc_t c_std_t = c_std * inv_tau, c_vis_t = c_vis * inv_tau, c_lang_t = c_lang * inv_tau,
                c_prior_t = c_prior * inv_tau;
    const bool need_p = do_gs || (do_gsp && c_prior != 0);
    acc_t* __restrict P = pbuf[0];
    acc_t* __restrict Q = pbuf[1];
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t n = std::min(kBlock, V - j0);
      if (need_s) load_block(z[0] + j0, xs, n, inv_tau);
      if (need_sp) load_block(z[1] + j0, xsp, n, inv_tau);
      if (need_t) load_block(z[2] + j0, xt, n, inv_tau);
      if (need_tp) load_block(z[3] + j0, xtp, n, inv_tau);
      if (need_r) target_block(xsp, xt, xtp, xr, n);
      // logits -> log-probabilities, in place; then p = exp(ls) in P.
      if (need_s) to_logp(xs, n, m0, l0);
      if (need_sp) to_logp(xsp, n, m1, l1);
      if (need_t) to_logp(xt, n, m2, l2);
      if (need_tp) to_logp(xtp, n, m3, l3);
      if (need_r) to_logp(xr, n, m4, l4);
      if (need_p) exp_block(xs, P, n);
      if (do_gs) {
        acc_t* __restrict g = gs + j0;
        if (c_vis != 0 && c_std != 0) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j)
            g[j] = P[j] * (c_std_t * (xs[j] - xt[j] - kstd) + c_vis_t * (xs[j] - xr[j] - kvis));
        } else if (c_vis != 0) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) g[j] = P[j] * (c_vis_t * (xs[j] - xr[j] - kvis));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) g[j] = P[j] * (c_std_t * (xs[j] - xt[j] - kstd));
        }
      }
      if (do_gsp) {
        acc_t* __restrict g = gsp + j0;
        if (c_prior != 0) {  // P := r - p
          exp_block(xr, Q, n);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) P[j] = Q[j] - P[j];
        }
        if (c_lang != 0) exp_block(xsp, Q, n);  // Q := p'
        if (c_prior != 0 && c_lang != 0) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j)
            g[j] = Q[j] * (c_lang_t * (xsp[j] - xtp[j] - klang)) + c_prior_t * P[j];
        } else if (c_prior != 0) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) g[j] = c_prior_t * P[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) g[j] = Q[j] * (c_lang_t * (xsp[j] - xtp[j] - klang));
        }
      }
    }
    if (gs && !do_gs) std::fill(gs, gs + V, acc_t(0));
    if (gsp && !do_gsp) std::fill(gsp, gsp + V, acc_t(0));
  }
}

static inline RowsFn pick(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat:
      return &rows<float, float>;
    case at::kDouble:
      return &rows<double, double>;
    case at::kBFloat16:
      return &rows<BF16Bits, float>;
    case at::kHalf:
      return &rows<HalfBits, float>;
    default:
      return nullptr;
  }
}

}  // namespace VGS_ISA_NS
}  // namespace vgs
