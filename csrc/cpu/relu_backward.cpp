// The backward of the fused ops' ReLU on the CPU, in one multithreaded pass: the masked gradient
// (aten.threshold_backward's rule) and its per-channel sum, the bias gradient.
//
// The sum is split into chunks whose number and bounds depend only on the tensor's shape, and the
// chunks' partial sums are added in chunk order, so the result is the same bits whatever the
// thread count (torch.use_deterministic_algorithms needs nothing more). Within a chunk the loops
// keep one accumulator per channel (channels_last) or kLanes per plane (NCHW), so that the
// compiler vectorizes them without reordering any sum.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../conv_args.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CNNKERNELS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CNNKERNELS_VECTOR_CLONES
#endif

namespace cnnkernels::cpu {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxChunks = 256;  // bounds the partial sums' memory: kMaxChunks x C accumulators

// `out <= 0` is false for NaN, so a NaN output lets the gradient through, as threshold_backward does.
template <typename T>
[[gnu::always_inline]] inline T masked(T grad, T out) {
  return static_cast<at::opmath_type<T>>(out) <= 0 ? T(0) : grad;
}

// channels_last: `rows` rows of C channels. acc[c] += each row's masked gradient.
template <typename T>
[[gnu::always_inline]] inline void rows_loop(const T* g, const T* o, T* gi, at::opmath_type<T>* acc,
                                             int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * C;
    for (int64_t c = 0; c < C; ++c) {
      const T v = masked(g[base + c], o[base + c]);
      gi[base + c] = v;
      acc[c] += static_cast<at::opmath_type<T>>(v);
    }
  }
}

// NCHW: one plane of n elements; returns its sum, added in a fixed lane order.
template <typename T>
[[gnu::always_inline]] inline at::opmath_type<T> plane_loop(const T* g, const T* o, T* gi, int64_t n) {
  using acc_t = at::opmath_type<T>;
  acc_t lanes[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const T v = masked(g[i + l], o[i + l]);
      gi[i + l] = v;
      lanes[l] += static_cast<acc_t>(v);
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const T v = masked(g[i], o[i]);
    gi[i] = v;
    lanes[i - full] += static_cast<acc_t>(v);
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

#define CNNKERNELS_DEFINE_LOOPS(T, SUFFIX)                                                          \
  CNNKERNELS_VECTOR_CLONES void rows_##SUFFIX(const T* g, const T* o, T* gi, at::opmath_type<T>* acc, \
                                              int64_t rows, int64_t C) {                            \
    rows_loop<T>(g, o, gi, acc, rows, C);                                                           \
  }                                                                                                 \
  CNNKERNELS_VECTOR_CLONES at::opmath_type<T> plane_##SUFFIX(const T* g, const T* o, T* gi, int64_t n) { \
    return plane_loop<T>(g, o, gi, n);                                                              \
  }
CNNKERNELS_DEFINE_LOOPS(float, f32)
CNNKERNELS_DEFINE_LOOPS(double, f64)
CNNKERNELS_DEFINE_LOOPS(at::BFloat16, bf16)
CNNKERNELS_DEFINE_LOOPS(at::Half, f16)
#undef CNNKERNELS_DEFINE_LOOPS

#define CNNKERNELS_OVERLOADS(T, SUFFIX)                                                                  \
  inline void rows_span(const T* g, const T* o, T* gi, at::opmath_type<T>* acc, int64_t r, int64_t C) { \
    rows_##SUFFIX(g, o, gi, acc, r, C);                                                                  \
  }                                                                                                      \
  inline at::opmath_type<T> plane_sum(const T* g, const T* o, T* gi, int64_t n) { return plane_##SUFFIX(g, o, gi, n); }
CNNKERNELS_OVERLOADS(float, f32)
CNNKERNELS_OVERLOADS(double, f64)
CNNKERNELS_OVERLOADS(at::BFloat16, bf16)
CNNKERNELS_OVERLOADS(at::Half, f16)
#undef CNNKERNELS_OVERLOADS

template <typename T>
void channels_last_pass(const T* g, const T* o, T* gi, T* grad_bias, int64_t rows, int64_t C) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows_per_chunk = std::max<int64_t>(64, (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<acc_t> partial(static_cast<size_t>(chunks * C), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
      rows_span(g + r0 * C, o + r0 * C, gi + r0 * C, partial.data() + k * C, r1 - r0, C);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t sum = 0;
    for (int64_t k = 0; k < chunks; ++k) sum += partial[k * C + c];
    grad_bias[c] = static_cast<T>(sum);
  }
}

template <typename T>
void nchw_pass(const T* g, const T* o, T* gi, T* grad_bias, int64_t N, int64_t C, int64_t HW) {
  using acc_t = at::opmath_type<T>;
  std::vector<acc_t> partial(static_cast<size_t>(N * C), acc_t(0));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(HW, 1));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) partial[p] = plane_sum(g + p * HW, o + p * HW, gi + p * HW, HW);
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t sum = 0;
    for (int64_t n = 0; n < N; ++n) sum += partial[n * C + c];
    grad_bias[c] = static_cast<T>(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> relu_backward_bias_grad_cpu(const at::Tensor& grad, const at::Tensor& output) {
  check_relu_backward_args(grad, output);
  const auto format = output_memory_format(output);
  const at::Tensor g = grad.contiguous(format), o = output.contiguous(format);
  at::Tensor grad_input = at::empty(o.sizes(), o.options().memory_format(format));
  const int64_t N = o.size(0), C = o.size(1), HW = o.size(2) * o.size(3);
  at::Tensor grad_bias = at::empty({C}, o.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "relu_backward_bias_grad_cpu", [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* po = o.const_data_ptr<scalar_t>();
    scalar_t* pgi = grad_input.mutable_data_ptr<scalar_t>();
    scalar_t* pb = grad_bias.mutable_data_ptr<scalar_t>();
    if (format == at::MemoryFormat::ChannelsLast) {
      channels_last_pass(pg, po, pgi, pb, N * HW, C);
    } else {
      nchw_pass(pg, po, pgi, pb, N, C, HW);
    }
  });
  return {grad_input, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) { m.impl("relu_backward_bias_grad", &relu_backward_bias_grad_cpu); }

}  // namespace cnnkernels::cpu
