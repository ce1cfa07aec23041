// vgs_kernels._C: the `torch.ops.vgs_kernels.vgs_rows` operator (schema, CPU and Meta kernels) and the
// Python module init. The CUDA kernel, when built, is registered from vgs_rows_cuda.cu.
#include <Python.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <string>

#include "vgs_common.h"

namespace vgs {

struct BF16Bits {
  uint16_t x;
};
struct HalfBits {
  uint16_t x;
};

// Raw pointers and strides of one call; the row range is given separately (parallel_for chunks).
struct RowsArgs {
  const void* z[4];
  int64_t z_stride[4];
  const float* coef;  // [n, 3] contiguous
  void* gs;           // acc dtype, row stride gs_stride, or nullptr
  void* gsp;
  int64_t gs_stride, gsp_stride;
  float* stats;  // [n, 4] contiguous
  int64_t V;      // row length of the gradient buffers
  int64_t vocab;  // real ids [0, vocab) of a row (columns [vocab, V) are padding)
  double temperature;
  bool detach;
};
using RowsFn = void (*)(const RowsArgs&, int64_t, int64_t);

}  // namespace vgs

// One copy of the kernel per instruction set, chosen at run time (the extension is compiled for the
// baseline ISA so that it runs on any x86-64 machine).
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define VGS_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#define VGS_ISA_NS avx512
#include "vgs_rows_cpu_kernel.h"
#undef VGS_ISA_NS
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define VGS_ISA_NS avx2
#include "vgs_rows_cpu_kernel.h"
#undef VGS_ISA_NS
#pragma GCC pop_options
#endif
#define VGS_ISA_NS base
#include "vgs_rows_cpu_kernel.h"
#undef VGS_ISA_NS

namespace vgs {

// The lower of two requests: "base" < "avx2" < "avx512" (anything else asks for nothing lower).
static int isa_cap(const char* env, int best) {
  if (env == nullptr) return best;
  std::string want = env;
  for (auto& ch : want) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  if (want == "base" || want == "default") return 0;
  if (want.rfind("avx2", 0) == 0) return std::min(best, 1);
  return best;
}

static const char* cpu_isa() {
#ifdef VGS_MULTI_ISA
  static const char* isa = []() -> const char* {
    __builtin_cpu_init();
    int best = 0;  // 0 = base, 1 = avx2, 2 = avx512
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = 2;
    // ATEN_CPU_CAPABILITY (default | avx2 | avx512) caps it like ATen's own kernels, so that one variable
    // emulates a CPU with a smaller instruction set for the whole process; VGS_CPU_ISA (base | avx2) caps
    // this kernel alone (for comparisons). Never a higher one than the CPU has.
    best = isa_cap(std::getenv("ATEN_CPU_CAPABILITY"), best);
    best = isa_cap(std::getenv("VGS_CPU_ISA"), best);
    static const char* names[3] = {"base", "avx2", "avx512"};
    return names[best];
  }();
  return isa;
#else
  return "base";
#endif
}

static RowsFn pick_kernel(at::ScalarType dt) {
#ifdef VGS_MULTI_ISA
  const std::string isa = cpu_isa();
  if (isa == "avx512") return avx512::pick(dt);
  if (isa == "avx2") return avx2::pick(dt);
#endif
  return base::pick(dt);
}

at::Tensor vgs_rows_cpu(const at::Tensor& zs, const at::Tensor& zsp, const at::Tensor& zt, const at::Tensor& ztp,
                        const at::Tensor& coef, double temperature, bool detach_target_prior,
                        const std::optional<at::Tensor>& grad_zs, const std::optional<at::Tensor>& grad_zsp,
                        std::optional<int64_t> vocab) {
  Prepared p = prepare(zs, zsp, zt, ztp, coef, temperature, grad_zs, grad_zsp, vocab, /*store_input_dtype=*/false);
  TORCH_CHECK(zs.device().is_cpu(), "vgs_rows (CPU kernel): tensors must be on the CPU");
  const RowsFn fn = pick_kernel(p.z[0].scalar_type());
  TORCH_CHECK(fn != nullptr, "vgs_rows: unsupported dtype ", p.z[0].scalar_type());
  RowsArgs a{};
  for (int k = 0; k < 4; ++k) {
    a.z[k] = p.z[k].data_ptr();
    a.z_stride[k] = p.z[k].stride(0);
  }
  a.coef = p.coef.data_ptr<float>();
  a.gs = p.gs.defined() ? p.gs.data_ptr() : nullptr;
  a.gsp = p.gsp.defined() ? p.gsp.data_ptr() : nullptr;
  a.gs_stride = p.gs.defined() ? p.gs.stride(0) : 0;
  a.gsp_stride = p.gsp.defined() ? p.gsp.stride(0) : 0;
  a.stats = p.stats.data_ptr<float>();
  a.V = p.V;
  a.vocab = p.vocab;
  a.temperature = temperature;
  a.detach = detach_target_prior;
  if (p.n > 0) {
    // Each row is independent (a gradient buffer may be that row's logits: each block is read before it
    // is written); small rows are batched so a task has >= ~16k vocabulary entries.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.V));
    at::parallel_for(0, p.n, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
  }
  finish(p);
  return p.stats;
}

// Shapes only, for fake tensors / torch.compile.
at::Tensor vgs_rows_meta(const at::Tensor& zs, const at::Tensor& zsp, const at::Tensor& zt, const at::Tensor& ztp,
                         const at::Tensor& coef, double temperature, bool detach_target_prior,
                         const std::optional<at::Tensor>& grad_zs, const std::optional<at::Tensor>& grad_zsp,
                         std::optional<int64_t> vocab) {
  TORCH_CHECK(zs.dim() == 2, "vgs_rows: zs must be [n, V], got ", zs.sizes());
  TORCH_CHECK(!vocab.has_value() || (*vocab >= 0 && *vocab <= zs.size(1)), "vgs_rows: vocab must be in [0, ",
              zs.size(1), "]");
  for (const at::Tensor* t : {&zsp, &zt, &ztp})
    TORCH_CHECK(t->sizes() == zs.sizes(), "vgs_rows: logits must share the shape of zs ", zs.sizes(), ", got ",
                t->sizes());
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == zs.size(0) && coef.size(1) == 3, "vgs_rows: coef must be [n, 3]");
  for (const auto* g : {&grad_zs, &grad_zsp})
    if (g->has_value() && (*g)->defined())
      TORCH_CHECK((*g)->sizes() == zs.sizes(), "vgs_rows: gradient buffers must be [n, V]");
  return at::empty({zs.size(0), 4}, zs.options().dtype(at::kFloat));
}

}  // namespace vgs

TORCH_LIBRARY(vgs_kernels, m) {
  m.def(
      "vgs_rows(Tensor zs, Tensor zsp, Tensor zt, Tensor ztp, Tensor coef, float temperature, "
      "bool detach_target_prior, Tensor(a!)? grad_zs=None, Tensor(b!)? grad_zsp=None, int? vocab=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(vgs_kernels, CPU, m) { m.impl("vgs_rows", &vgs::vgs_rows_cpu); }
TORCH_LIBRARY_IMPL(vgs_kernels, Meta, m) { m.impl("vgs_rows", &vgs::vgs_rows_meta); }

// `import vgs_kernels._C` loads this library (which registers the operators above) and gets a
// module with constants describing the build: WITH_CUDA (0/1) and CPU_ISA (the CPU kernel in use).
static struct PyModuleDef vgs_module = {PyModuleDef_HEAD_INIT, "_C", "VGS row kernels (torch.ops.vgs_kernels)", -1,
                                        nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&vgs_module);
  if (mod == nullptr) return nullptr;
#ifdef VGS_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  PyModule_AddStringConstant(mod, "CPU_ISA", vgs::cpu_isa());
  return mod;
}
