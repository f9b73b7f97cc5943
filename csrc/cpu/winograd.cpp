// 3x3 stride-1 conv + bias (+ residual) + ReLU on the CPU through Winograd F(4x4, 3x3), for
// fp32, and the input gradient of such convs. Why: oneDNN's direct conv already runs these
// layers near the FMA peak, so only fewer multiplies make them faster. F(4x4, 3x3) needs 36
// multiplies per 4x4 output tile and channel pair instead of 144, but its transforms cost memory
// traffic, and its 36 thin GEMMs must run near the peak too: through at::bmm (MKL, which takes its
// AVX2 path on AMD CPUs) they ran at about 40% of oneDNN's speed on a Zen 5 EPYC, and Winograd won
// on half of the VGG-16 and ResNet-50 3x3 layers there; through oneDNN's matmul it ran 1.2-2.9x
// the direct conv on all but the 7x7 one. Which way wins still depends on the CPU and the
// problem, so each problem runs the way that measured faster on this machine (measured_faster).
//
// The output is cut into 4x4 tiles, and tiles into blocks that each thread runs start to end
// while they stay in cache:
//   1. each 6x6 input tile d becomes V = Bt d B            (36 values per tile and channel)
//   2. the 36 products M[i] = V[i] @ U[i] are one batched GEMM, with U = G w Gt cached per weight
//   3. each tile's Y = At M A, plus bias and residual, then ReLU, is stored in the output.
// The matrices are Lavin & Gray's, with interpolation points 0, +-1, +-2 and infinity.
//
// Error: about 1e-6 normwise relative in fp32, where the direct conv has about 2e-7 (measured
// on VGG/ResNet layer shapes). The transforms mix a tile's values, so a NaN or infinity in the
// input would spread to outputs of its tile that do not see it; such inputs, and values large
// enough to overflow in the transforms, are detected and the conv reruns on the direct path.
#include "winograd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "../conv_args.h"
#include "conv2d_relu.h"
#include "elementwise.h"
#include "weight_cache.h"

// oneDNN's matmul as PyTorch wraps it: exported by libtorch_cpu but absent from its installed
// headers. Declared weak, so that a torch without it still loads this extension (the GEMMs then
// run through at::bmm).
namespace at::native {
[[gnu::weak]] void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                                 float alpha);
}  // namespace at::native

namespace cnnkernels::cpu {
namespace {

// Weights or transformed inputs at or beyond this magnitude send the conv to the direct path:
// below it, neither the GEMM nor the output transform can overflow where the direct conv would not.
constexpr float kSafeMagnitude = 1e15f;

// Below this many input or output channels the GEMM is too thin for Winograd to pay.
constexpr int64_t kMinChannels = 16;

std::atomic<int64_t> completed_runs{0};

// 16 channels at a time through GCC's vector extension: target_clones turns it into one
// AVX-512 register, two AVX2 ones or four SSE ones. (GCC does not vectorize these loops over
// channels by itself: it gives up on the 6x6 tile.) Leftover channels run with T = float.
// The helpers taking and returning Lanes are always inlined, so GCC's note that such values pass
// differently without AVX-512 (-Wpsabi) concerns no real call.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float Lanes __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16;

template <typename T>
[[gnu::always_inline]] inline T load(const float* p) {
  if constexpr (std::is_same_v<T, float>) return *p; else return *reinterpret_cast<const Lanes*>(p);
}
template <typename T>
[[gnu::always_inline]] inline void store(float* p, T value) {
  if constexpr (std::is_same_v<T, float>) *p = value; else *reinterpret_cast<Lanes*>(p) = value;
}

// V[a*6+b] = (Bt d B)[a][b] for the channels at d[0..width) of one 6x6 tile, whose element
// (p, q) sits at d + p*row + q*col; consecutive V entries are v_stride apart.
template <typename T>
[[gnu::always_inline]] inline void input_transform_lanes(const float* d, int64_t row, int64_t col, float* v,
                                                         int64_t v_stride) {
  T t[6][6];
#pragma GCC unroll 6
  for (int q = 0; q < 6; ++q) {
    const float* x = d + q * col;
    const T d0 = load<T>(x), d1 = load<T>(x + row), d2 = load<T>(x + 2 * row), d3 = load<T>(x + 3 * row),
            d4 = load<T>(x + 4 * row), d5 = load<T>(x + 5 * row);
    t[0][q] = 4.f * d0 - 5.f * d2 + d4;
    t[1][q] = -4.f * (d1 + d2) + d3 + d4;
    t[2][q] = 4.f * (d1 - d2) - d3 + d4;
    t[3][q] = 2.f * (d3 - d1) - d2 + d4;
    t[4][q] = 2.f * (d1 - d3) - d2 + d4;
    t[5][q] = 4.f * d1 - 5.f * d3 + d5;
  }
#pragma GCC unroll 6
  for (int a = 0; a < 6; ++a) {
    float* out = v + a * 6 * v_stride;
    const T* r = t[a];
    store<T>(out, 4.f * r[0] - 5.f * r[2] + r[4]);
    store<T>(out + v_stride, -4.f * (r[1] + r[2]) + r[3] + r[4]);
    store<T>(out + 2 * v_stride, 4.f * (r[1] - r[2]) - r[3] + r[4]);
    store<T>(out + 3 * v_stride, 2.f * (r[3] - r[1]) - r[2] + r[4]);
    store<T>(out + 4 * v_stride, 2.f * (r[1] - r[3]) - r[2] + r[4]);
    store<T>(out + 5 * v_stride, 4.f * r[1] - 5.f * r[3] + r[5]);
  }
}

// The input transform of one tile over all C channels (channel c at offset c).
CNNKERNELS_VECTOR_CLONES void input_transform(const float* d, int64_t row, int64_t col, float* v,
                                              int64_t v_stride, int64_t C) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) input_transform_lanes<Lanes>(d + c, row, col, v + c, v_stride);
  for (; c < C; ++c) input_transform_lanes<float>(d + c, row, col, v + c, v_stride);
}

// y[(i*4+j)*y_stride] = (At M A)[i][j] for the channels at m[0..width) of one tile, whose
// M[a*6+b] sits at m + (a*6+b)*m_stride.
template <typename T>
[[gnu::always_inline]] inline void output_transform_lanes(const float* m, int64_t m_stride, float* y,
                                                          int64_t y_stride) {
  T t[4][6];
#pragma GCC unroll 6
  for (int b = 0; b < 6; ++b) {
    const float* x = m + b * m_stride;
    const int64_t s = 6 * m_stride;
    const T m0 = load<T>(x), m1 = load<T>(x + s), m2 = load<T>(x + 2 * s), m3 = load<T>(x + 3 * s),
            m4 = load<T>(x + 4 * s), m5 = load<T>(x + 5 * s);
    t[0][b] = m0 + (m1 + m2) + (m3 + m4);
    t[1][b] = (m1 - m2) + 2.f * (m3 - m4);
    t[2][b] = (m1 + m2) + 4.f * (m3 + m4);
    t[3][b] = (m1 - m2) + 8.f * (m3 - m4) + m5;
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const T* r = t[i];
    float* out = y + i * 4 * y_stride;
    store<T>(out, r[0] + (r[1] + r[2]) + (r[3] + r[4]));
    store<T>(out + y_stride, (r[1] - r[2]) + 2.f * (r[3] - r[4]));
    store<T>(out + 2 * y_stride, (r[1] + r[2]) + 4.f * (r[3] + r[4]));
    store<T>(out + 3 * y_stride, (r[1] - r[2]) + 8.f * (r[3] - r[4]) + r[5]);
  }
}

// The output transform of one tile over all K channels, into y[(i*4+j)*K + k].
CNNKERNELS_VECTOR_CLONES void output_transform(const float* m, int64_t m_stride, float* y, int64_t K) {
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) output_transform_lanes<Lanes>(m + k, m_stride, y + k, K);
  for (; k < K; ++k) output_transform_lanes<float>(m + k, m_stride, y + k, K);
}

// out[k] = relu(y[k] + bias[k] (+ residual[k])), or without the ReLU; `s < 0` is false for NaN,
// which passes as in torch.relu.
CNNKERNELS_VECTOR_CLONES void bias_add_act(const float* __restrict y, const float* __restrict bias,
                                           const float* __restrict residual, float* __restrict out,
                                           int64_t K, bool relu) {
  if (residual) {
    for (int64_t k = 0; k < K; ++k) {
      const float s = y[k] + bias[k] + residual[k];
      out[k] = relu && s < 0.f ? 0.f : s;
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const float s = y[k] + bias[k];
      out[k] = relu && s < 0.f ? 0.f : s;
    }
  }
}

// u[(a*6+b)*u_stride] = (G g Gt)[a][b] for the output channels at g[0..width) of one 3x3 filter
// whose tap (p, q) sits at g + (p*3+q)*K.
template <typename T>
[[gnu::always_inline]] inline void weight_transform_lanes(const float* g, int64_t K, float* u, int64_t u_stride) {
  constexpr float kSixth = 1.f / 6, kTwelfth = 1.f / 12, kTwentyFourth = 1.f / 24;
  T t[6][3];
#pragma GCC unroll 3
  for (int q = 0; q < 3; ++q) {
    const T g0 = load<T>(g + q * K), g1 = load<T>(g + (3 + q) * K), g2 = load<T>(g + (6 + q) * K);
    t[0][q] = 0.25f * g0;
    t[1][q] = -kSixth * (g0 + g1 + g2);
    t[2][q] = -kSixth * (g0 - g1 + g2);
    t[3][q] = kTwentyFourth * g0 + kTwelfth * g1 + kSixth * g2;
    t[4][q] = kTwentyFourth * g0 - kTwelfth * g1 + kSixth * g2;
    t[5][q] = g2;
  }
#pragma GCC unroll 6
  for (int a = 0; a < 6; ++a) {
    const T* r = t[a];
    float* out = u + a * 6 * u_stride;
    store<T>(out, 0.25f * r[0]);
    store<T>(out + u_stride, -kSixth * (r[0] + r[1] + r[2]));
    store<T>(out + 2 * u_stride, -kSixth * (r[0] - r[1] + r[2]));
    store<T>(out + 3 * u_stride, kTwentyFourth * r[0] + kTwelfth * r[1] + kSixth * r[2]);
    store<T>(out + 4 * u_stride, kTwentyFourth * r[0] - kTwelfth * r[1] + kSixth * r[2]);
    store<T>(out + 5 * u_stride, r[2]);
  }
}

// The weight transform of one input channel's K filters, into u[(a*6+b)*u_stride + k].
CNNKERNELS_VECTOR_CLONES void weight_transform(const float* g, float* u, int64_t u_stride, int64_t K) {
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) weight_transform_lanes<Lanes>(g + k, K, u + k, u_stride);
  for (; k < K; ++k) weight_transform_lanes<float>(g + k, K, u + k, u_stride);
}

// Whether every value has magnitude below kSafeMagnitude (false for NaN and infinities).
CNNKERNELS_VECTOR_CLONES bool all_safe(const float* __restrict p, int64_t n) {
  constexpr int kLanes = 16;
  int bad[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) bad[l] |= !(std::fabs(p[i + l]) < kSafeMagnitude);
  int any = 0;
  for (; i < n; ++i) any |= !(std::fabs(p[i]) < kSafeMagnitude);
  for (int l = 0; l < kLanes; ++l) any |= bad[l];
  return !any;
}

// Whether at::native::mkldnn_matmul runs here: it exists, works (it refuses CPUs without AVX-512
// or AVX-NE-CONVERT) and the user has not turned oneDNN off.
bool onednn_matmul_usable() {
  static const bool works = [] {
    if (at::native::mkldnn_matmul == nullptr) return false;
    try {
      const at::Tensor a = at::ones({2, 16, 16}), c = at::empty({2, 16, 16});
      at::native::mkldnn_matmul(a, a, c, 0.f, 1.f);
      return c.eq(16).all().item<bool>();
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return works && at::globalContext().userEnabledMkldnn();
}

// m[i] = v[i] @ u[i] for the 36 Winograd points. Through oneDNN where it runs: MKL's sgemm, which
// at::bmm calls, ran these shapes at 80-100 GFLOP/s per core on a Zen 5 EPYC (MKL takes its AVX2
// path on AMD CPUs), oneDNN's at 200-245. Both honour torch.backends.mkldnn.matmul.fp32_precision
// ("bf16" or "tf32" lowers the GEMMs' precision, as it does at::bmm's).
void batched_gemm(const at::Tensor& v, const at::Tensor& u, at::Tensor& m) {
  if (onednn_matmul_usable()) {
    at::native::mkldnn_matmul(v, u, m, /*beta=*/0.f, /*alpha=*/1.f);
  } else {
    at::bmm_out(m, v, u);
  }
}

// Tiles per block: the GEMM rows. oneDNN's GEMM wants about 128 of them (64 channels: 256), while
// a block's V and M, 36 x 4 bytes per row and channel each, stay in the cache best when small;
// measured on the VGG-16 and ResNet-50 layers at batch 4, between 64 and 256 rows. The blocks are
// spread evenly over the threads: 196 tiles of 512 channels in 5 blocks for 2 threads ran 1.5x
// slower than in 2.
int64_t tiles_per_block(int64_t tiles, int64_t C, int64_t K) {
  const int64_t rows = std::clamp<int64_t>(16384 / std::max(C, K), 128, 256);
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = ((tiles + rows - 1) / rows + threads - 1) / threads * threads;
  return (tiles + blocks - 1) / blocks;
}

// Winograd pays only with enough 4x4 tiles for every thread's GEMM rows, and when the tiles are
// mostly inside the output (a 9x9 output needs 12x12 of tiles). At batch 4 it ran a 512-channel
// 7x7 layer (16 tiles) 0.8x the direct conv and 9x9 (36 tiles, 56% inside) 0.8x; 256 channels
// at 14x14 (64 tiles, 77% inside) 1.8x.
bool enough_tiles(int64_t N, int64_t OH, int64_t OW) {
  constexpr int64_t kMinTilesPerThread = 16;
  constexpr double kMinInside = 0.7;
  if (OH <= 0 || OW <= 0) return false;
  const int64_t tiles_h = (OH + 3) / 4, tiles_w = (OW + 3) / 4;
  const double inside = static_cast<double>(OH * OW) / (16 * tiles_h * tiles_w);
  return N * tiles_h * tiles_w >= kMinTilesPerThread * at::get_num_threads() && inside >= kMinInside;
}

// CNNKERNELS_CPU_WINOGRAD: "0" never, "1" wherever the geometry suits (the tests' setting, so
// that they run these kernels), otherwise where it also measured faster than the direct path on
// this machine (below).
enum class Mode { kOff, kWherever, kMeasured };

Mode mode() {
  static const Mode chosen = [] {
    const char* value = std::getenv("CNNKERNELS_CPU_WINOGRAD");
    const std::string setting = value ? value : "";
    return setting == "0" ? Mode::kOff : setting == "1" ? Mode::kWherever : Mode::kMeasured;
  }();
  return chosen;
}

bool enabled() { return mode() != Mode::kOff; }

// Runs `winograd` where it measured faster than `direct` for this problem (`key`), timing both on
// the problem's first call, as cudnn.benchmark times cuDNN's algorithms: each once to warm up
// (weight caches, first touches of memory), then three times more, alternating, the best of
// three counting. Undefined: run the direct path (the caller does, so that the input gradient
// can come from the same convolution_backward call as the weight gradient). Which way wins
// depends on the CPU and the problem: on a Zen 5 EPYC (2026-12-07) Winograd ran 1.2-2.9x the
// direct conv on the VGG-16 and ResNet-50 3x3 stride-1 layers at batch 4 except 512 channels at
// 7x7 (0.94x; benchmarks/results/2026-12-07_CPU-AMD-EPYC-Zen5-2-threads_winograd-onednn-gemm.txt),
// and with its GEMMs through MKL it had lost on half of them. The price, as with
// cudnn.benchmark: which way wins a close race follows the timing, so outputs may differ (by
// Winograd's rounding) from one process to the next. Deterministic mode keeps the geometric
// rule: no timing decides.
at::Tensor measured_faster(std::vector<int64_t> key, const std::function<at::Tensor()>& winograd,
                           const std::function<at::Tensor()>& direct) {
  if (mode() == Mode::kWherever || at::globalContext().deterministicAlgorithms()) return winograd();
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, bool> winograd_faster;
  key.push_back(at::get_num_threads());
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto known = winograd_faster.find(key); known != winograd_faster.end()) {
      return known->second ? winograd() : at::Tensor();
    }
  }
  double best[2] = {INFINITY, INFINITY};
  at::Tensor out;
  for (int round = 0; round < 4; ++round) {
    for (int way = 0; way < 2; ++way) {
      const auto start = std::chrono::steady_clock::now();
      out = way == 0 ? winograd() : direct();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!out.defined()) return out;  // values Winograd cannot take: nothing was measured
      if (round > 0) best[way] = std::min(best[way], seconds);
    }
  }
  const std::lock_guard<std::mutex> lock(mutex);
  winograd_faster.emplace(key, best[0] < best[1]);
  return out;  // the direct path's, as right as Winograd's
}

// Whether a conv from C to K channels with this geometry, producing N x OH x OW, suits Winograd.
bool suits(const at::Tensor& w, int64_t N, int64_t C, int64_t K, int64_t OH, int64_t OW, at::IntArrayRef stride,
           at::IntArrayRef dilation, int64_t groups) {
  return enabled() && groups == 1 && w.size(2) == 3 && w.size(3) == 3 &&
         stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1 &&
         C >= kMinChannels && K >= kMinChannels && enough_tiles(N, OH, OW);
}

// U = G w Gt for a (K, C, 3, 3) weight, as (36, C, K). Undefined when the weight holds NaN,
// infinities or values too large for the transforms. A loop over 16 output channels at a time:
// an optimizer changes the weight every training step, so this runs once per conv call there
// (a float64 einsum took 95 ms for 512x512 channels, about 10x the conv's own time).
at::Tensor transformed_weight(const at::Tensor& weight) {
  const int64_t K = weight.size(0), C = weight.size(1);
  const at::Tensor w = weight.permute({1, 2, 3, 0}).contiguous();  // (C, 3, 3, K): k innermost
  // |U| <= max |w|: every row of G sums to at most 1 in absolute value.
  if (!all_safe(w.const_data_ptr<float>(), w.numel())) return at::Tensor();
  at::Tensor u = at::empty({36, C, K}, weight.options());
  const float* wp = w.const_data_ptr<float>();
  float* up = u.mutable_data_ptr<float>();
  at::parallel_for(0, C, 16, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) weight_transform(wp + c * 9 * K, up + c * K, C * K, K);
  });
  return u;
}

// U for this form of the weight: cached while the weight is unchanged. A weight that changes
// between calls (training) is transformed anew only for convs with enough output pixels to repay
// it: for 512x512 channels, the transform cost more than Winograd saved at 784 pixels.
// Undefined: run the direct conv.
at::Tensor weight_for(WeightForm form, const at::Tensor& weight, int64_t pixels,
                      const std::function<at::Tensor()>& transform) {
  constexpr int64_t kMinPixelsForChangingWeight = 1024;
  const PreparedWeight prepared = prepared_weight(form, weight, {}, {}, {}, {}, 1, transform);
  if (!prepared.changing) return prepared.tensor;
  return pixels >= kMinPixelsForChangingWeight ? transform() : at::Tensor();
}

// Whether Winograd takes convs in `dtype`: fp32, and the 16-bit dtypes whose convs run in fp32 on
// this CPU anyway (conv2d_relu.h), computed in fp32 and rounded once.
bool computes_in_fp32(at::ScalarType dtype) { return dtype == at::kFloat || conv_runs_in_fp32(dtype); }

// Winograd runs in fp32 channels_last: other inputs and outputs are converted (a copy each way).
// Tensor::to alone may return a strided view as it is, when its strides suggest the format.
at::Tensor as_dtype_in(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
  return t.to(t.options().dtype(dtype), /*non_blocking=*/false, /*copy=*/false, format).contiguous(format);
}

at::Tensor fp32_channels_last(const at::Tensor& t) {
  return as_dtype_in(t, at::kFloat, at::MemoryFormat::ChannelsLast);
}

// conv3x3(x, w) + bias (+ residual), then ReLU if `relu`, in channels_last, for x dense
// channels_last and u = transformed_weight(w). Undefined when x holds values the transforms
// cannot take (NaN, infinities, huge).
at::Tensor run(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias,
               const at::Tensor& residual, int64_t pad_h, int64_t pad_w, bool relu) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = u.size(2);
  const int64_t OH = H + 2 * pad_h - 2, OW = W + 2 * pad_w - 2;
  at::Tensor out = at::empty({N, K, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  const int64_t tiles_h = (OH + 3) / 4, tiles_w = (OW + 3) / 4, tiles = N * tiles_h * tiles_w;
  const int64_t block = tiles_per_block(tiles, C, K);
  const int64_t blocks = (tiles + block - 1) / block;

  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float* rp = residual.defined() ? residual.const_data_ptr<float>() : nullptr;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::zeros({K}, x.options());
  const float* bp = b.const_data_ptr<float>();
  std::atomic<bool> unsafe{false};

  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    // Each thread keeps its scratch (at most about 2 x 9 MB, for 2048 channels) between calls:
    // fresh allocations of this size are mapped and page-faulted anew on every call, which cost
    // 10-15% of the time of 64- and 128-channel layers here.
    thread_local std::vector<float> v_scratch, m_scratch;
    v_scratch.resize(std::max(v_scratch.size(), static_cast<size_t>(36 * block * C)));
    m_scratch.resize(std::max(m_scratch.size(), static_cast<size_t>(36 * block * K)));
    std::vector<float> edge(36 * C), y(16 * K);
    float* vp = v_scratch.data();
    float* mp = m_scratch.data();
    for (int64_t blk = first; blk < last && !unsafe.load(std::memory_order_relaxed); ++blk) {
      // V is (36, count, C) and M (36, count, K), both dense.
      const int64_t t0 = blk * block, count = std::min(block, tiles - t0);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t tile = t0 + t, n = tile / (tiles_h * tiles_w);
        const int64_t ih = (tile / tiles_w % tiles_h) * 4 - pad_h, iw = tile % tiles_w * 4 - pad_w;
        const float* img = xp + n * H * W * C;
        if (ih >= 0 && iw >= 0 && ih + 6 <= H && iw + 6 <= W) {
          input_transform(img + (ih * W + iw) * C, W * C, C, vp + t * C, count * C, C);
        } else {  // a tile over the padding: gather its inside part, zeros elsewhere
          std::fill(edge.begin(), edge.end(), 0.f);
          for (int64_t p = std::max<int64_t>(0, -ih); p < std::min<int64_t>(6, H - ih); ++p)
            for (int64_t q = std::max<int64_t>(0, -iw); q < std::min<int64_t>(6, W - iw); ++q)
              std::copy_n(img + ((ih + p) * W + iw + q) * C, C, edge.data() + (p * 6 + q) * C);
          input_transform(edge.data(), 6 * C, C, vp + t * C, count * C, C);
        }
      }
      if (!all_safe(vp, 36 * count * C)) {
        unsafe = true;
        break;
      }
      at::Tensor m = at::from_blob(mp, {36, count, K}, x.options());
      batched_gemm(at::from_blob(vp, {36, count, C}, x.options()), u, m);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t tile = t0 + t, n = tile / (tiles_h * tiles_w);
        const int64_t oh0 = (tile / tiles_w % tiles_h) * 4, ow0 = tile % tiles_w * 4;
        output_transform(mp + t * K, count * K, y.data(), K);
        for (int64_t i = 0; i < 4 && oh0 + i < OH; ++i)
          for (int64_t j = 0; j < 4 && ow0 + j < OW; ++j) {
            const int64_t at = ((n * OH + oh0 + i) * OW + ow0 + j) * K;
            bias_add_act(y.data() + (i * 4 + j) * K, bp, rp ? rp + at : nullptr, op + at, K, relu);
          }
      }
    }
  });
  if (unsafe) return at::Tensor();
  completed_runs.fetch_add(1, std::memory_order_relaxed);
  return out;
}

}  // namespace

at::Tensor winograd_conv2d_bias_relu(const at::Tensor& input, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups, const std::function<at::Tensor()>& direct) {
  const int64_t OH = input.size(2) + 2 * padding[0] - 2, OW = input.size(3) + 2 * padding[1] - 2;
  if (!computes_in_fp32(input.scalar_type()) || input.numel() == 0 ||
      !suits(weight, input.size(0), input.size(1), weight.size(0), OH, OW, stride, dilation, groups)) {
    return {};
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto output_format = conv_output_memory_format(input, weight);
  const auto winograd = [&]() -> at::Tensor {
    const at::Tensor u = weight_for(WeightForm::kWinograd, weight, input.size(0) * OH * OW,
                                    [&] { return transformed_weight(weight.to(at::kFloat)); });
    if (!u.defined()) return {};
    const c10::optional<at::Tensor> b =
        bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : bias;
    const at::Tensor out = run(fp32_channels_last(input), u, b,
                               residual.defined() ? fp32_channels_last(residual) : residual, padding[0], padding[1],
                               /*relu=*/true);
    return out.defined() ? as_dtype_in(out, input.scalar_type(), output_format) : out;
  };
  // The layouts and the dtype are part of the problem: they decide the conversions on both paths.
  const bool cl_input = input.is_contiguous(cl), cl_output = output_format == cl;
  return measured_faster({0, input.size(0), input.size(1), weight.size(0), input.size(2), input.size(3), padding[0],
                          padding[1], residual.defined(), cl_input, cl_output,
                          static_cast<int64_t>(input.scalar_type())},
                         winograd, direct);
}

at::Tensor winograd_conv2d_input_grad(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, const std::function<at::Tensor()>& direct) {
  // The input gradient of a 3x3 stride-1 conv is a 3x3 stride-1 conv of the output gradient with
  // the weight flipped in space and its channels swapped, padded by 2 - padding.
  if (!computes_in_fp32(grad.scalar_type()) || grad.numel() == 0 || padding[0] > 2 || padding[1] > 2 ||
      !suits(weight, grad.size(0), weight.size(0), weight.size(1), input.size(2), input.size(3), stride,
             dilation, groups)) {
    return {};
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto input_grad_format = conv_output_memory_format(input, weight);
  const auto winograd = [&]() -> at::Tensor {
    const at::Tensor u =
        weight_for(WeightForm::kWinogradInputGrad, weight, input.size(0) * input.size(2) * input.size(3),
                   [&] { return transformed_weight(weight.to(at::kFloat).flip({2, 3}).transpose(0, 1)); });
    if (!u.defined()) return {};
    const at::Tensor out = run(fp32_channels_last(grad), u, c10::nullopt, at::Tensor(), 2 - padding[0],
                               2 - padding[1], /*relu=*/false);
    return out.defined() ? as_dtype_in(out, grad.scalar_type(), input_grad_format) : out;
  };
  const bool cl_grad = grad.is_contiguous(cl), cl_input_grad = input_grad_format == cl;
  return measured_faster({1, grad.size(0), weight.size(0), weight.size(1), input.size(2), input.size(3), padding[0],
                          padding[1], cl_grad, cl_input_grad, static_cast<int64_t>(grad.scalar_type())},
                         winograd, direct);
}

int64_t winograd_runs() { return completed_runs.load(std::memory_order_relaxed); }

}  // namespace cnnkernels::cpu
