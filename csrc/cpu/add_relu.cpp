// relu(a + b) in one multithreaded pass. The inner loop is plain C++ that the compiler
// vectorizes; target_clones builds it for AVX-512, AVX2 and baseline x86-64 and picks one
// at load time, so the extension still runs on any x86-64 CPU.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../conv_args.h"
#include "elementwise.h"

namespace cnnkernels::cpu {
namespace {

// `s < 0` is false for NaN, so NaN passes through as torch.relu lets it.
template <typename T, bool kAdd>
[[gnu::always_inline]] inline void add_relu_loop(const T* a, const T* b, T* out, int64_t n) {
  using acc_t = at::opmath_type<T>;
  for (int64_t i = 0; i < n; ++i) {
    acc_t s = static_cast<acc_t>(a[i]);
    if constexpr (kAdd) s += static_cast<acc_t>(b[i]);
    out[i] = static_cast<T>(s < acc_t(0) ? acc_t(0) : s);
  }
}

#define CNNKERNELS_DEFINE_SPAN(T, NAME)                                                   \
  CNNKERNELS_VECTOR_CLONES void NAME(const T* a, const T* b, T* out, int64_t n) {         \
    if (b) add_relu_loop<T, true>(a, b, out, n); else add_relu_loop<T, false>(a, b, out, n); \
  }
CNNKERNELS_DEFINE_SPAN(float, span_f32)
CNNKERNELS_DEFINE_SPAN(double, span_f64)
CNNKERNELS_DEFINE_SPAN(at::BFloat16, span_bf16)
CNNKERNELS_DEFINE_SPAN(at::Half, span_f16)
#undef CNNKERNELS_DEFINE_SPAN

inline void span(const float* a, const float* b, float* o, int64_t n) { span_f32(a, b, o, n); }
inline void span(const double* a, const double* b, double* o, int64_t n) { span_f64(a, b, o, n); }
inline void span(const at::BFloat16* a, const at::BFloat16* b, at::BFloat16* o, int64_t n) { span_bf16(a, b, o, n); }
inline void span(const at::Half* a, const at::Half* b, at::Half* o, int64_t n) { span_f16(a, b, o, n); }

constexpr int64_t kGrain = 1 << 15;

}  // namespace

void add_relu_dense(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "add_relu_dense", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
      span(pa + begin, pb ? pb + begin : nullptr, po + begin, end - begin);
    });
  });
}

namespace {

at::Tensor add_relu_cpu(const at::Tensor& input, const at::Tensor& other) {
  check_add_relu_args(input, other);
  // The output laid out as torch lays out relu(input + other); operands already laid out so
  // are read in place, the others copied so once.
  at::Tensor out = empty_add_relu_output(input, other);
  const at::Tensor a = laid_out_as(input, out), b = laid_out_as(other, out);
  add_relu_dense(a, b, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) { m.impl("add_relu", &add_relu_cpu); }

}  // namespace cnnkernels::cpu
