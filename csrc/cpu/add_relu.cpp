// relu(a + b) in one multithreaded pass. The inner loop is plain C++ that the compiler
// vectorizes; target_clones builds it for AVX-512, AVX2 and baseline x86-64 and picks one
// at load time, so the extension still runs on any x86-64 CPU. fp16 on x86 CPUs with F16C, and
// bf16 on those with AVX2 but not AVX-512 BW, take an intrinsics loop instead (add_relu_avx2).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

#if defined(__x86_64__) && defined(__GNUC__)
// 16-bit dtypes through AVX2 and F16C intrinsics, eight lanes in fp32 at a time. fp16: the compiler
// vectorizes neither c10::Half's conversion well (0.28 ns per element: 0.66-0.84x eager
// torch.relu(x + y)) nor GCC 12's _Float16 (library calls, 5 ns); F16C's conversions ran 0.08 ns
// (Zen 5, one thread). bf16, on CPUs without AVX-512 BW (with it, the x86-64-v4 clone above
// vectorizes c10::BFloat16 well): GCC's AVX2 clone keeps its rounding (a NaN branch) scalar, 0.89x
// torch.compile on a Zen 3, against 1.14x here. bf16 -> fp32 is a 16-bit shift; fp32 -> bf16
// rounds to nearest even as c10::BFloat16 does, NaN to 0x7FC0. NaN stays NaN either way: the ReLU's
// comparison is false for it.
#define CNNKERNELS_AVX2_F16C __attribute__((target("avx2,f16c"), always_inline)) inline

CNNKERNELS_AVX2_F16C __m256 widen8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

CNNKERNELS_AVX2_F16C __m256 widen8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

CNNKERNELS_AVX2_F16C __m128i narrow8(__m256 s, const at::Half*) {
  return _mm256_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT);
}

CNNKERNELS_AVX2_F16C __m128i narrow8(__m256 s, const at::BFloat16*) {
  const __m256i bits = _mm256_castps_si256(s);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)));
  // Each 32-bit lane holds a 16-bit value: pack them (per 128-bit half), then join the halves.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000));
}
#undef CNNKERNELS_AVX2_F16C

template <typename T, bool kAdd>
__attribute__((target("avx2,f16c"))) void add_relu_avx2(const T* a, const T* b, T* out, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 s = widen8(a + i);
    if constexpr (kAdd) s = _mm256_add_ps(s, widen8(b + i));
    s = _mm256_blendv_ps(s, zero, _mm256_cmp_ps(s, zero, _CMP_LT_OQ));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), narrow8(s, out));
  }
  add_relu_loop<T, kAdd>(a + i, kAdd ? b + i : nullptr, out + i, n - i);
}

bool cpu_has_avx2_f16c() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

inline void span(const at::Half* a, const at::Half* b, at::Half* o, int64_t n) {
  if (!cpu_has_avx2_f16c()) return span_f16(a, b, o, n);
  if (b) add_relu_avx2<at::Half, true>(a, b, o, n); else add_relu_avx2<at::Half, false>(a, b, o, n);
}

inline void span(const at::BFloat16* a, const at::BFloat16* b, at::BFloat16* o, int64_t n) {
  static const bool avx2_is_best = cpu_has_avx2_f16c() && !__builtin_cpu_supports("avx512bw");
  if (!avx2_is_best) return span_bf16(a, b, o, n);
  if (b) add_relu_avx2<at::BFloat16, true>(a, b, o, n); else add_relu_avx2<at::BFloat16, false>(a, b, o, n);
}
#else
inline void span(const at::Half* a, const at::Half* b, at::Half* o, int64_t n) { span_f16(a, b, o, n); }
inline void span(const at::BFloat16* a, const at::BFloat16* b, at::BFloat16* o, int64_t n) { span_bf16(a, b, o, n); }
#endif

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
