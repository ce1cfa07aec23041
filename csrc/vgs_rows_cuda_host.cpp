// Host side of the CUDA row kernel: argument checks (vgs_common.h's prepare), the launch on the current
// stream, and the registration of torch.ops.vgs_kernels.vgs_rows for CUDA tensors. Compiled only into a
// CUDA build (setup.py defines VGS_WITH_CUDA); the kernel itself is in vgs_rows_cuda.cu.
#ifdef VGS_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "vgs_common.h"
#include "vgs_rows_cuda.h"

namespace vgs {
namespace {

CudaDtype cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CudaDtype::kFloat;
    case at::kDouble:
      return CudaDtype::kDouble;
    case at::kHalf:
      return CudaDtype::kHalf;
    case at::kBFloat16:
      return CudaDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "vgs_rows (CUDA kernel): unsupported dtype ", t);
  }
}

at::Tensor vgs_rows_cuda(const at::Tensor& zs, const at::Tensor& zsp, const at::Tensor& zt, const at::Tensor& ztp,
                         const at::Tensor& coef, double temperature, bool detach_target_prior,
                         const std::optional<at::Tensor>& grad_zs, const std::optional<at::Tensor>& grad_zsp,
                         std::optional<int64_t> vocab) {
  TORCH_CHECK(zs.is_cuda(), "vgs_rows (CUDA kernel): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(zs.device());
  // gradients are written in the logits' dtype when the buffers have it (else fp32 / fp64)
  Prepared p = prepare(zs, zsp, zt, ztp, coef, temperature, grad_zs, grad_zsp, vocab, /*store_input_dtype=*/true);
  for (const at::Tensor* t : {&p.z[1], &p.z[2], &p.z[3], &p.coef, &p.gs, &p.gsp})
    TORCH_CHECK(!t->defined() || t->device() == zs.device(), "vgs_rows: every tensor must be on ", zs.device(),
                ", got one on ", t->device());
  TORCH_CHECK(p.n < (int64_t(1) << 31), "vgs_rows: too many rows for one launch");
  if (p.n > 0) {
    CudaRowsArgs a{};
    for (int k = 0; k < 4; ++k) {
      a.z[k] = p.z[k].const_data_ptr();
      a.z_stride[k] = p.z[k].stride(0);
    }
    a.coef = p.coef.const_data_ptr<float>();
    a.gs = p.gs.defined() ? p.gs.mutable_data_ptr() : nullptr;
    a.gsp = p.gsp.defined() ? p.gsp.mutable_data_ptr() : nullptr;
    a.gs_stride = p.gs.defined() ? p.gs.stride(0) : 0;
    a.gsp_stride = p.gsp.defined() ? p.gsp.stride(0) : 0;
    a.stats = p.stats.mutable_data_ptr<float>();
    a.n = p.n;
    a.vocab = p.vocab;
    a.width = p.V;
    a.temperature = temperature;
    a.detach = detach_target_prior;
    const at::ScalarType out = p.gs.defined() ? p.gs.scalar_type() : p.gsp.defined() ? p.gsp.scalar_type() : p.acc;
    launch_vgs_rows_cuda(a, cuda_dtype(p.z[0].scalar_type()), cuda_dtype(out),
                         c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish(p);
  return p.stats;
}

}  // namespace
}  // namespace vgs

TORCH_LIBRARY_IMPL(vgs_kernels, CUDA, m) { m.impl("vgs_rows", &vgs::vgs_rows_cuda); }

#endif  // VGS_WITH_CUDA
