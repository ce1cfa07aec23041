// The interface between the CUDA row kernel (vgs_rows_cuda.cu, compiled by nvcc with light headers
// only) and its host side (vgs_rows_cuda_host.cpp: checks, dispatcher registration, ATen). No ATen here.
#pragma once

#include <cstdint>

namespace vgs {

// Element types of the logits and of the gradient buffers.
enum class CudaDtype : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

struct CudaRowsArgs {
  const void* z[4];      // zs, zsp, zt, ztp: [n, width] rows, unit column stride
  int64_t z_stride[4];   // row strides (elements)
  const float* coef;     // [n, 3] contiguous
  void* gs;              // gradient buffers ([n, width], unit column stride) or nullptr
  void* gsp;
  int64_t gs_stride, gsp_stride;
  float* stats;          // [n, 4] contiguous
  int64_t n, vocab, width;
  double temperature;
  bool detach;
};

// Launches the kernel on `stream` (a cudaStream_t); the caller checks the launch. Gradients are
// written in `out` (the logits' dtype, or their fp32 / fp64 math type).
void launch_vgs_rows_cuda(const CudaRowsArgs& args, CudaDtype in, CudaDtype out, void* stream);

}  // namespace vgs
