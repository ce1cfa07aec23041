// Shared by the CPU (vgs_rows_cpu.cpp) and CUDA (vgs_rows_cuda_host.cpp) implementations of the VGS row op.
//
// The row contract is the one of vgs_kernels/backends/torch_rows.py:
//   vgs_rows(zs, zsp, zt, ztp, coef, temperature, detach_target_prior, grad_zs?, grad_zsp?) -> stats
// zs..ztp: [n, V] logits of one float dtype, last dim contiguous, any row stride;
// coef: [n, 3] (c_std, c_vis, c_lang); grads: [n, V] buffers overwritten with the logit gradients
// (they may be zs / zsp themselves: kernels read each entry before writing it); vocab: the real ids
// [0, vocab) of a row, columns [vocab, V) are padding (never read, gradient 0);
// stats: [n, 4] float32 (std, vis, lang, vds). Math in fp32 (fp64 for fp64 inputs);
// -inf logits are read as NEG_LOGIT.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace vgs {

// A finite stand-in for -inf logits (torch_rows.NEG_LOGIT): exp() of it underflows to 0.
constexpr double kNegLogit = -1.0e30;

// Inputs after the checks: four [n, V] logits of one dtype with unit column stride, fp32 coef,
// and the buffers the kernel writes gradients into (unit column stride; the acc dtype, or the
// logits' dtype for kernels that store it). When a caller's gradient tensor cannot be written
// directly (other dtype or layout), the kernel writes a temporary that is copied back afterwards.
struct Prepared {
  at::Tensor z[4];
  at::Tensor coef;
  at::Tensor gs, gsp;            // undefined when not requested
  at::Tensor gs_out, gsp_out;    // the caller's tensors when a copy back is needed
  at::Tensor stats;              // [n, 4] float32
  int64_t n = 0, V = 0;
  int64_t vocab = 0;  // real ids per row (<= V)
  at::ScalarType acc = at::kFloat;
};

inline at::Tensor unit_col_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

inline at::Tensor grad_buffer(const std::optional<at::Tensor>& g, const char* name, int64_t n, int64_t V,
                              at::ScalarType acc, at::Tensor& copy_back) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  const at::Tensor& t = *g;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == V, "vgs_rows: ", name, " must be [", n, ", ", V,
              "], got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "vgs_rows: ", name, " must be floating point");
  if (t.scalar_type() == acc && (V <= 1 || t.stride(1) == 1)) return t;
  copy_back = t;
  return at::empty({n, V}, t.options().dtype(acc));
}

// store_input_dtype: the kernel can write gradients in the logits' dtype (else only in the acc dtype).
inline Prepared prepare(const at::Tensor& zs, const at::Tensor& zsp, const at::Tensor& zt, const at::Tensor& ztp,
                        const at::Tensor& coef, double temperature, const std::optional<at::Tensor>& grad_zs,
                        const std::optional<at::Tensor>& grad_zsp, std::optional<int64_t> vocab,
                        bool store_input_dtype) {
  const at::Tensor* in[4] = {&zs, &zsp, &zt, &ztp};
  const char* names[4] = {"zs", "zsp", "zt", "ztp"};
  TORCH_CHECK(zs.dim() == 2, "vgs_rows: zs must be [n, V], got ", zs.sizes());
  TORCH_CHECK(temperature > 0, "vgs_rows: temperature must be positive, got ", temperature);
  Prepared p;
  p.n = zs.size(0);
  p.V = zs.size(1);
  at::ScalarType dt = zs.scalar_type();
  for (int k = 0; k < 4; ++k) {
    TORCH_CHECK(in[k]->dim() == 2 && in[k]->size(0) == p.n && in[k]->size(1) == p.V, "vgs_rows: ", names[k],
                " must have the shape of zs ", zs.sizes(), ", got ", in[k]->sizes());
    TORCH_CHECK(at::isFloatingType(in[k]->scalar_type()), "vgs_rows: ", names[k], " must be floating point");
    TORCH_CHECK(in[k]->device() == zs.device(), "vgs_rows: ", names[k], " is on ", in[k]->device(),
                ", zs on ", zs.device());
    dt = at::promote_types(dt, in[k]->scalar_type());
  }
  for (int k = 0; k < 4; ++k) p.z[k] = unit_col_stride(in[k]->scalar_type() == dt ? *in[k] : in[k]->to(dt));
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == p.n && coef.size(1) == 3, "vgs_rows: coef must be [", p.n,
              ", 3], got ", coef.sizes());
  p.coef = coef.to(zs.device(), at::kFloat).contiguous();
  p.vocab = vocab.has_value() ? *vocab : p.V;
  TORCH_CHECK(p.vocab >= 0 && p.vocab <= p.V, "vgs_rows: vocab must be in [0, ", p.V, "], got ", p.vocab);
  p.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  // one gradient dtype for both buffers: the logits' when the kernel stores it and the first buffer has it
  at::ScalarType out = p.acc;
  const std::optional<at::Tensor>& first = (grad_zs.has_value() && grad_zs->defined()) ? grad_zs : grad_zsp;
  if (store_input_dtype && first.has_value() && first->defined() && first->scalar_type() == dt) out = dt;
  p.gs = grad_buffer(grad_zs, "grad_zs", p.n, p.V, out, p.gs_out);
  p.gsp = grad_buffer(grad_zsp, "grad_zsp", p.n, p.V, out, p.gsp_out);
  p.stats = at::empty({p.n, 4}, zs.options().dtype(at::kFloat));
  return p;
}

inline void finish(Prepared& p) {
  if (p.gs_out.defined()) p.gs_out.copy_(p.gs);
  if (p.gsp_out.defined()) p.gsp_out.copy_(p.gsp);
}

}  // namespace vgs
