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
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

#include "../conv_args.h"
#include "elementwise.h"

namespace cnnkernels::cpu {
namespace {

constexpr int64_t kLanes = 32;  // independent accumulators per NCHW plane: two AVX-512 vectors of float
// For float/double planes shorter than 4 * kLanes (7x7), whose scalar tail would dominate: 0.65x
// eager at 8x2048x7x7 fp32 with 32 lanes, 1.0x with 8 (measured). 16-bit floats keep 32 lanes:
// with 8 their loop stops vectorizing (7x slower).
constexpr int64_t kShortLanes = 8;
constexpr int64_t kMaxChunks = 256;  // bounds the partial sums' memory: kMaxChunks x C accumulators

// The element rule of each dtype, on its storage type: v() is the masked gradient and acc() its
// value in the accumulation type. `out <= 0` is false for NaN, so a NaN output lets the gradient
// through, as threshold_backward does.
template <typename T>
struct FloatRule {
  using Storage = T;
  using Acc = T;
  [[gnu::always_inline]] static T v(T grad, T out) { return out <= T(0) ? T(0) : grad; }
  [[gnu::always_inline]] static T acc(T v) { return v; }
};

// 16-bit floats are compared on their bits, which vectorizes where a conversion of every value
// does not: out <= 0 is +-0, or a sign bit with a magnitude up to infinity's (above it is NaN).
template <uint16_t kInfinityBits>
struct Bits16Rule {
  using Storage = uint16_t;
  using Acc = float;
  [[gnu::always_inline]] static uint16_t v(uint16_t grad, uint16_t out) {
    const uint16_t magnitude = out & 0x7FFF;
    const bool at_most_zero = magnitude == 0 || ((out & 0x8000) && magnitude <= kInfinityBits);
    return at_most_zero ? uint16_t{0} : grad;
  }
};
struct BFloat16Rule : Bits16Rule<0x7F80> {
  [[gnu::always_inline]] static float acc(uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
};
struct HalfRule : Bits16Rule<0x7C00> {
  [[gnu::always_inline]] static float acc(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
};

template <typename T> struct RuleOf { using type = FloatRule<T>; };
template <> struct RuleOf<at::BFloat16> { using type = BFloat16Rule; };
template <> struct RuleOf<at::Half> { using type = HalfRule; };

// channels_last: `rows` rows of C channels. acc[c] += each row's masked gradient.
template <typename Rule, typename S = typename Rule::Storage, typename A = typename Rule::Acc>
[[gnu::always_inline]] inline void rows_loop(const S* g, const S* o, S* gi, A* acc, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * C;
    for (int64_t c = 0; c < C; ++c) {
      const S v = Rule::v(g[base + c], o[base + c]);
      gi[base + c] = v;
      acc[c] += Rule::acc(v);
    }
  }
}

// channels_last with fewer than 16 channels, whose loop over C is too short to vectorize: the
// rows as one span of n elements (n a multiple of C), with P = lcm(C, 16) accumulators, acc[j]
// taking the elements at j mod P, so channel j mod C (8x6x28x28: 8.6 us per call, 15.2 with the
// row loop). plane_loop below is the same loop with a compile-time P: given P at run time, it ran
// 8x2048x7x7 NCHW planes 1.2x slower.
template <typename Rule, typename S = typename Rule::Storage, typename A = typename Rule::Acc>
[[gnu::always_inline]] inline void periodic_loop(const S* g, const S* o, S* gi, A* acc, int64_t n, int64_t P) {
  const int64_t full = n - n % P;
  for (int64_t i = 0; i < full; i += P) {
    for (int64_t j = 0; j < P; ++j) {
      const S v = Rule::v(g[i + j], o[i + j]);
      gi[i + j] = v;
      acc[j] += Rule::acc(v);
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const S v = Rule::v(g[i], o[i]);
    gi[i] = v;
    acc[i - full] += Rule::acc(v);
  }
}

// NCHW: one plane of n elements; returns its sum, added in a fixed lane order.
template <typename Rule, int64_t kLanes, typename S = typename Rule::Storage, typename A = typename Rule::Acc>
[[gnu::always_inline]] inline A plane_loop(const S* g, const S* o, S* gi, int64_t n) {
  A lanes[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const S v = Rule::v(g[i + l], o[i + l]);
      gi[i + l] = v;
      lanes[l] += Rule::acc(v);
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const S v = Rule::v(g[i], o[i]);
    gi[i] = v;
    lanes[i - full] += Rule::acc(v);
  }
  A sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// One vectorized clone set per dtype; rows_span/plane_sum pick it by the element type.
#define CNNKERNELS_DEFINE_LOOPS(T, SUFFIX)                                                             \
  using Rule_##SUFFIX = RuleOf<T>::type;                                                               \
  using S_##SUFFIX = Rule_##SUFFIX::Storage;                                                           \
  using A_##SUFFIX = Rule_##SUFFIX::Acc;                                                               \
  CNNKERNELS_VECTOR_CLONES void rows_##SUFFIX(const S_##SUFFIX* g, const S_##SUFFIX* o, S_##SUFFIX* gi, \
                                              A_##SUFFIX* acc, int64_t rows, int64_t C) {              \
    rows_loop<Rule_##SUFFIX>(g, o, gi, acc, rows, C);                                                  \
  }                                                                                                    \
  CNNKERNELS_VECTOR_CLONES void periodic_##SUFFIX(const S_##SUFFIX* g, const S_##SUFFIX* o,            \
                                                  S_##SUFFIX* gi, A_##SUFFIX* acc, int64_t n, int64_t P) { \
    periodic_loop<Rule_##SUFFIX>(g, o, gi, acc, n, P);                                                 \
  }                                                                                                    \
  CNNKERNELS_VECTOR_CLONES A_##SUFFIX plane_##SUFFIX(const S_##SUFFIX* g, const S_##SUFFIX* o,         \
                                                     S_##SUFFIX* gi, int64_t n) {                      \
    constexpr int64_t short_lanes = sizeof(S_##SUFFIX) == 2 ? kLanes : kShortLanes;                   \
    return n >= 4 * kLanes ? plane_loop<Rule_##SUFFIX, kLanes>(g, o, gi, n)                            \
                           : plane_loop<Rule_##SUFFIX, short_lanes>(g, o, gi, n);                      \
  }                                                                                                    \
  inline void rows_span(const T* g, const T* o, T* gi, A_##SUFFIX* acc, int64_t rows, int64_t C) {     \
    rows_##SUFFIX(reinterpret_cast<const S_##SUFFIX*>(g), reinterpret_cast<const S_##SUFFIX*>(o),      \
                  reinterpret_cast<S_##SUFFIX*>(gi), acc, rows, C);                                    \
  }                                                                                                    \
  inline void periodic_span(const T* g, const T* o, T* gi, A_##SUFFIX* acc, int64_t n, int64_t P) {      \
    periodic_##SUFFIX(reinterpret_cast<const S_##SUFFIX*>(g), reinterpret_cast<const S_##SUFFIX*>(o),  \
                      reinterpret_cast<S_##SUFFIX*>(gi), acc, n, P);                                   \
  }                                                                                                    \
  inline A_##SUFFIX plane_sum(const T* g, const T* o, T* gi, int64_t n) {                              \
    return plane_##SUFFIX(reinterpret_cast<const S_##SUFFIX*>(g), reinterpret_cast<const S_##SUFFIX*>(o), \
                          reinterpret_cast<S_##SUFFIX*>(gi), n);                                       \
  }
CNNKERNELS_DEFINE_LOOPS(float, f32)
CNNKERNELS_DEFINE_LOOPS(double, f64)
CNNKERNELS_DEFINE_LOOPS(at::BFloat16, bf16)
CNNKERNELS_DEFINE_LOOPS(at::Half, f16)
#undef CNNKERNELS_DEFINE_LOOPS

template <typename T>
void channels_last_pass(const T* g, const T* o, T* gi, T* grad_bias, int64_t rows, int64_t C) {
  using acc_t = at::opmath_type<T>;
  const int64_t rows_per_chunk = std::max<int64_t>(64, (rows + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  // Accumulators per chunk: one per channel, or P = lcm(C, 16) for fewer than 16 channels.
  const int64_t width = C < 16 ? C * 16 / std::gcd<int64_t>(C, 16) : C;
  std::vector<acc_t> partial(static_cast<size_t>(chunks * width), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
      acc_t* acc = partial.data() + k * width;
      if (width == C) {
        rows_span(g + r0 * C, o + r0 * C, gi + r0 * C, acc, r1 - r0, C);
      } else {
        periodic_span(g + r0 * C, o + r0 * C, gi + r0 * C, acc, (r1 - r0) * C, width);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t sum = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      for (int64_t j = c; j < width; j += C) sum += partial[k * width + j];
    }
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
  const auto format = output.suggest_memory_format();
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
