// Conv + bias (+ residual) + ReLU on the CPU. 3x3 stride-1 fp32 convs with enough channels run
// through Winograd with the epilogue fused (winograd.cpp). Others: the convolution with its
// bias, then one fused residual+ReLU pass in place, or the ReLU as oneDNN's post-op (below).
// Tiny fp32 convs (LeNet-5's; see tiny_conv) take ATen's own im2col + GEMM kernel. fp16 and bf16
// convs run in fp32 where PyTorch's oneDNN lacks that dtype (see cpu_runs_onednn_fp16 and _bf16).
// For channels_last input the convolution is oneDNN's (mkldnn::_convolution_pointwise, the
// primitive PyTorch's own CPU fusion uses) with the weight handed over already reordered into
// oneDNN's blocked layout (cached: weight_cache.h), which saves 1.1-2.3x on layers with large
// weights and small images (measured at batch 4, fp32). Otherwise (NCHW input, tiny or changing
// weights) it is at::convolution, as F.conv2d runs it: there the boxed oneDNN call only adds
// cost (1x1 64->64 at 56x56, batch 1, NCHW: 345 vs 286 us).
// oneDNN's fused ReLU post-op turns NaN into 0 (measured here with torch 2.14.1), where torch.relu
// keeps NaN: it runs only on the reordered-weight path without a residual, where no output can be
// NaN (relu_post_op_exact) and checking that costs less than the ReLU pass it saves (convs whose
// output outweighs their input and weight; up to 1.54x there at batch 4 on a Zen 5,
// benchmarks/results/2026-12-07_CPU-AMD-EPYC-Zen5-2-threads_relu-post-op.txt).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
#include <torch/library.h>

#include "../conv_args.h"
#include "conv2d_relu.h"
#include "elementwise.h"
#include "weight_cache.h"
#include "winograd.h"

namespace cnnkernels::cpu {
namespace {

c10::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

at::Tensor conv_onednn(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, bool relu) {
  static const auto op = find_op("mkldnn::_convolution_pointwise", "");
  const c10::IValue none;
  torch::jit::Stack stack{x, w, (bias.has_value() && bias->defined()) ? c10::IValue(*bias) : none,
                          padding.vec(), stride.vec(), dilation.vec(), groups, std::string(relu ? "relu" : "none"),
                          c10::List<c10::optional<at::Scalar>>(), none};
  op->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// The weight in oneDNN's blocked layout for this geometry. oneDNN reorders a weight that is not
// dense itself, on each call.
at::Tensor reorder_for_onednn(const at::Tensor& w, at::IntArrayRef input_sizes, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!w.is_non_overlapping_and_dense()) return w;
  static const auto reorder = find_op("mkldnn::_reorder_convolution_weight", "");
  torch::jit::Stack stack{w, padding.vec(), stride.vec(), dilation.vec(), groups, input_sizes.vec()};
  reorder->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// PyTorch's oneDNN takes bf16 only on CPUs with AVX-512 BW/VL/DQ (mkldnn_bf16_device_check).
// Elsewhere at::convolution's bf16 conv is ATen's slow fallback, 8x slower than fp32 on a Zen 3
// (AVX2; VGG-16's 64>64 3x3 at 224x224, batch 4: 828 vs 108 ms): bf16 convs run in fp32 there,
// rounded to bf16 once, forward and backward, as fp16 convs do below.
bool cpu_runs_onednn_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

// The largest of the masked bits (here: exponent fields), a max reduction the compiler vectorizes
// (an OR of comparisons stayed scalar and took longer than the conv on some 1x1 layers).
CNNKERNELS_VECTOR_CLONES uint16_t max_masked_bits16(const uint16_t* bits, int64_t n, uint16_t mask) {
  uint16_t largest = 0;
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, static_cast<uint16_t>(bits[i] & mask));
  return largest;
}

CNNKERNELS_VECTOR_CLONES uint32_t max_masked_bits32(const uint32_t* bits, int64_t n, uint32_t mask) {
  uint32_t largest = 0;
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, bits[i] & mask);
  return largest;
}

// PyTorch's oneDNN takes fp16 only on CPUs with AVX-512 FP16 (mkldnn_fp16_device_check; those
// with AMX-FP16 have it too). Elsewhere at::convolution's fp16 conv is ATen's slow fallback, which
// ran 20-40x slower than fp32 on a Zen 5 (VGG-16's 64>64 3x3 at 224x224, batch 4: 375 ms): fp16
// convs run in fp32 there, rounded to fp16 once, as the bf16 convs below that oneDNN gets wrong.
bool cpu_runs_onednn_fp16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512fp16");
  return ok;
#else
  return false;
#endif
}

constexpr int kNotFinite = std::numeric_limits<int>::max();

// A bound on t's magnitudes, from one read of its exponent bits: every value v has |v| < 2^bound,
// or kNotFinite if t holds NaN or an infinity (or is not fp32, bf16 or fp16).
int magnitude_bound(const at::Tensor& t) {
  const at::Tensor c = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  const auto chunks = [&](auto reduce) {  // the largest masked bits over every chunk
    std::atomic<uint32_t> largest{0};
    at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      const uint32_t mine = reduce(begin, end - begin);
      uint32_t seen = largest.load(std::memory_order_relaxed);
      while (mine > seen && !largest.compare_exchange_weak(seen, mine, std::memory_order_relaxed)) {
      }
    });
    return largest.load(std::memory_order_relaxed);
  };
  // The exponent field e (all ones: NaN or infinity) bounds |v| < 2^(e + 1 - bias), subnormals too.
  const auto bound = [](uint32_t e, uint32_t all_ones, int bias) {
    return e == all_ones ? kNotFinite : static_cast<int>(e) + 1 - bias;
  };
  const void* data = c.const_data_ptr();
  const auto* bits16 = static_cast<const uint16_t*>(data);
  const auto* bits32 = static_cast<const uint32_t*>(data);
  switch (c.scalar_type()) {
    case at::kFloat:
      return bound(chunks([&](int64_t i, int64_t n) { return max_masked_bits32(bits32 + i, n, 0x7F800000u); }) >> 23,
                   0xFF, 127);
    case at::kBFloat16:
      return bound(chunks([&](int64_t i, int64_t n) { return max_masked_bits16(bits16 + i, n, 0x7F80); }) >> 7, 0xFF,
                   127);
    case at::kHalf:
      return bound(chunks([&](int64_t i, int64_t n) { return max_masked_bits16(bits16 + i, n, 0x7C00); }) >> 10, 0x1F,
                   15);
    default:
      return kNotFinite;
  }
}

// oneDNN's bf16 convs (torch 2.14.1 and 2.11.0, AVX-512 BF16; found by random searches against
// float64) get two kinds of input wrong, forward and backward: NaN and infinities spread to
// outputs (or gradients) that do not depend on them (a third of small-channel convs, either
// layout), and channels_last convs with a column stride above 1 give uninitialized values where
// the output is one column wide (the output) or up to two (the weight gradient). Whether this
// bf16 conv is one of those, given whether it is that narrow and its operands that may hold NaN
// (the input; in the backward, the gradient too). Such convs run in fp32, which oneDNN gets
// right, rounded to bf16 once as the bf16 kernels round their fp32 sums.
bool onednn_bf16_gets_wrong(bool narrow_strided_channels_last, std::initializer_list<int> may_hold_nan_bounds) {
  return narrow_strided_channels_last ||
         std::any_of(may_hold_nan_bounds.begin(), may_hold_nan_bounds.end(), [](int b) { return b == kNotFinite; });
}

std::atomic<int64_t> relu_post_op_runs{0};

// Whether oneDNN's ReLU post-op, which turns NaN into 0, gives torch.relu's result: whether no
// output can be NaN, given magnitude_bound of the input (read by the caller, often already). That
// holds when input, weight and bias are finite and no sum of the taps' products can overflow:
// |sum| < taps * 2^(x + w) + 2^b <= 2^127 < FLT_MAX (fp32 accumulation, in bf16 convs too) when
// x + w + log2(taps) <= 126 and b <= 126. A -0.0 output comes out +0.0, as from oneDNN's own
// fused op (mkldnn::_convolution_pointwise with "relu", checked); torch.relu keeps -0.0.
// CNNKERNELS_CPU_RELU_POST_OP=0 keeps the ReLU pass everywhere (-0.0 too, and for A/B timings).
bool relu_post_op_exact(int input_bound, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  static const bool enabled = [] {
    const char* value = std::getenv("CNNKERNELS_CPU_RELU_POST_OP");
    return !(value && std::string(value) == "0");
  }();
  if (!enabled || input_bound == kNotFinite) return false;
  const int weight_bound = magnitude_bound(w);
  if (weight_bound == kNotFinite) return false;
  if (bias.has_value() && bias->defined() && magnitude_bound(*bias) > 126) return false;
  int log2_taps = 0;
  while ((int64_t{1} << log2_taps) < w.size(1) * w.size(2) * w.size(3)) ++log2_taps;
  return input_bound + weight_bound + log2_taps <= 126;
}

// Whether oneDNN's channels_last conv (fp32 and bf16, torch 2.14.1 and 2.11.0) may crash on this
// shape: an input at most two columns wide, column stride and dilation above 1. A random search
// segfaulted in 15 of 300 such fp32 convs with a bias (none without) and 16 of 300 bf16 ones, none
// in NCHW nor at widths 3-4; the bound 4 keeps a margin, these convs being tiny. They run in NCHW.
bool onednn_may_crash_in_channels_last(const ConvShape& s, at::IntArrayRef stride, at::IntArrayRef dilation) {
  return stride[1] > 1 && dilation[1] > 1 && s.W <= 4;
}

// Whether the reordered-weight oneDNN path runs this conv: oneDNN is there and takes the dtype,
// the weight is big enough for reordering it once to pay for the boxed call (below 1024 elements,
// e.g. LeNet's first conv, at::convolution is ~10% faster), and the problem is not a single small
// image with small kernels, where ATen's own kernel is several times faster than setting up a
// oneDNN primitive (14 vs 43 us for 1x4x8x8, 3x3; ATen's own rule, use_mkldnn in Convolution.cpp).
bool reordered_onednn_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups) {
  static const bool have_op = at::hasMKLDNN() && find_op("mkldnn::_convolution_pointwise", "").has_value() &&
                              find_op("mkldnn::_reorder_convolution_weight", "").has_value();
  const bool dtype_ok = x.scalar_type() == at::kFloat ||
                        (x.scalar_type() == at::kBFloat16 && cpu_runs_onednn_bf16());
  const bool small = x.size(0) == 1 && groups == 1 && !(w.size(2) > 3 && w.size(3) > 3) && x.numel() <= 20480;
  return have_op && dtype_ok && w.numel() >= 1024 && !small;
}

// Whether ATen's im2col + GEMM kernel (thnn_conv2d) runs this conv: fp32, no groups or dilation
// (which it lacks), at most 1e6 multiply-adds. There oneDNN's per-call setup costs more than the
// work: LeNet-5's convs ran 31 vs 82 us (1>6 5x5 at 32x32) and 24 vs 64 us (6>16 5x5 at 14x14) at
// batch 1, 39 vs 101 and 50 vs 74 us at batch 4, against at::convolution (which picks oneDNN). No
// layer measured at or below 1e6 lost; above, 3-channel inputs already lost 1.6x at 1.8e6 (2 threads,
// benchmarks/results/2026-12-06_CPU-AMD-EPYC-2-threads_tiny-convs.txt).
std::atomic<int64_t> tiny_runs{0};

bool tiny_conv(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups) {
  if (x.scalar_type() != at::kFloat || groups != 1 || dilation[0] != 1 || dilation[1] != 1) return false;
  const double out_h = (x.size(2) + 2 * padding[0] - w.size(2)) / stride[0] + 1;
  const double out_w = (x.size(3) + 2 * padding[1] - w.size(3)) / stride[1] + 1;
  const double macs = static_cast<double>(x.size(0)) * w.size(0) * out_h * out_w * w.size(1) * w.size(2) * w.size(3);
  return macs <= 1e6;
}

// The strides at::empty gives a 4-D tensor of this shape in `format`.
std::vector<int64_t> canonical_strides(at::IntArrayRef sizes, at::MemoryFormat format) {
  const int64_t C = sizes[1], H = sizes[2], W = sizes[3];
  return format == at::MemoryFormat::ChannelsLast ? std::vector<int64_t>{H * W * C, 1, W * C, C}
                                                  : std::vector<int64_t>{C * H * W, H * W, W, 1};
}

// t with the canonical strides of `format`, copied only if it is not laid out that way. Size-1
// dimensions leave a tensor contiguous in both formats with either strides, and thnn_conv2d picks
// its layout from the strides. The result may be a view of its copy.
at::Tensor strided_as(const at::Tensor& t, at::MemoryFormat format) {
  const at::Tensor c = t.contiguous(format);
  return c.as_strided(c.sizes(), canonical_strides(c.sizes(), format));
}

// The same for the op's output, which gets no view: a copy, in the rare case that needs one.
// Without it, an output computed in NCHW and asked for in channels_last (the convs above that
// oneDNN may crash on) kept NCHW strides when its size-1 dimensions made it pass as channels_last:
// strides that differ from F.conv2d's and the fake kernel's, and that name the other layout to
// the next op (suggest_memory_format).
at::Tensor output_strided_as(const at::Tensor& t, at::MemoryFormat format) {
  const at::Tensor c = t.contiguous(format);
  if (c.strides() == at::IntArrayRef(canonical_strides(c.sizes(), format))) return c;
  return at::empty(c.sizes(), c.options().memory_format(format)).copy_(c);
}

// The layout a tiny conv computes in: the input's, except with one input channel, where ATen's
// channels_last im2col ran 6x slower than NCHW (LeNet-5's first conv, batch 4: 232-270 vs 38 us;
// its backward 2x) and NCHW costs no copy of the input.
at::MemoryFormat tiny_layout(const at::Tensor& x, at::MemoryFormat format) {
  return x.size(1) == 1 ? at::MemoryFormat::Contiguous : format;
}

at::Tensor conv_tiny(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::MemoryFormat format) {
  const auto layout = tiny_layout(x, format);
  return at::thnn_conv2d(strided_as(x, layout), strided_as(w, layout), {w.size(2), w.size(3)}, bias, stride, padding);
}

// The conv through oneDNN (or ATen's kernel for tiny convs), then bias, residual and ReLU.
at::Tensor conv2d_bias_act_direct(const at::Tensor& input, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, const ConvShape& shape, at::MemoryFormat format) {
  const auto CL = at::MemoryFormat::ChannelsLast;
  const bool in_nchw = onednn_may_crash_in_channels_last(shape, stride, dilation);
  const auto compute_format = in_nchw ? at::MemoryFormat::Contiguous : format;
  // With compute_format's own strides: a tensor contiguous in both formats through size-1
  // dimensions may carry the other format's strides, which oneDNN follows (an NCHW-contiguous
  // 1x5x1 image with channels_last strides crashed it as above).
  const at::Tensor x_in = strided_as(input, compute_format);
  std::optional<int> x_in_bound;  // x_in's magnitude_bound, read at most once
  const auto input_bound = [&] { return x_in_bound ? *x_in_bound : *(x_in_bound = magnitude_bound(x_in)); };
  const bool in_fp32 =
      conv_runs_in_fp32(input.scalar_type()) ||
      (input.scalar_type() == at::kBFloat16 &&
       onednn_bf16_gets_wrong(compute_format == CL && shape.OW == 1 && stride[1] > 1, {input_bound()}));
  const at::Tensor x = in_fp32 ? x_in.to(at::kFloat) : x_in;
  // at::convolution computes in channels_last when the weight is so: NCHW needs both NCHW.
  const at::Tensor w_in = in_nchw ? strided_as(weight, compute_format) : weight;
  // Converted only where a conv reads it: a cached reordered weight needs no conversion per call.
  const auto w = [&] { return in_fp32 ? w_in.to(at::kFloat) : w_in; };
  const c10::optional<at::Tensor> b =
      in_fp32 && bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : bias;
  const at::Tensor r = residual.defined() ? residual.contiguous(format) : residual;

  const bool tiny = tiny_conv(x, w_in, stride, padding, dilation, groups);  // w's sizes, x's dtype
  // The reordered weight makes oneDNN compute in channels_last: only for channels_last input. A
  // weight that changes between calls (training) is not reordered: at::convolution takes it. The
  // cache keeps one dtype per weight, the one its calls run in on this CPU (fp32 for 16-bit dtypes
  // that conv_runs_in_fp32): the bf16 calls that run in fp32 only for oneDNN's bugs skip it.
  const bool cached_dtype_fits = in_fp32 == conv_runs_in_fp32(input.scalar_type());
  at::Tensor reordered;
  if (!tiny && cached_dtype_fits && compute_format == CL && reordered_onednn_takes(x, w_in, groups)) {
    const PreparedWeight prepared = prepared_weight(
        WeightForm::kOneDnnBlocked, weight, x.sizes(), stride, padding, dilation, groups,
        [&] { return reorder_for_onednn(w(), x.sizes(), stride, padding, dilation, groups); });
    if (!prepared.changing) reordered = prepared.tensor;
  }
  // The ReLU as oneDNN's post-op, where proving it exact (reading the weight, and the input unless
  // read above) costs less than half the pass over the output that it saves.
  bool relu_in_conv = false;
  if (reordered.defined() && !residual.defined()) {
    const int64_t out_bytes = shape.N * shape.K * shape.OH * shape.OW * input.element_size();
    const int64_t check_bytes = w_in.nbytes() + (x_in_bound ? 0 : x_in.nbytes());
    relu_in_conv = check_bytes < out_bytes && relu_post_op_exact(input_bound(), w_in, bias);
  }
  at::Tensor out = tiny                 ? conv_tiny(x, w(), b, stride, padding, compute_format)
                   : reordered.defined() ? conv_onednn(x, reordered, b, stride, padding, dilation, groups, relu_in_conv)
                   : at::convolution(x, w(), b, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups);
  out = output_strided_as(out.to(input.scalar_type()), format);
  if (relu_in_conv) {
    relu_post_op_runs.fetch_add(1, std::memory_order_relaxed);
  } else {
    add_relu_dense(out, r, out);
  }
  if (tiny) tiny_runs.fetch_add(1, std::memory_order_relaxed);
  return out;
}

at::Tensor conv2d_bias_act_cpu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef requested_dilation, int64_t groups) {
  const ConvShape shape = check_conv2d_args(op, input, weight, bias, residual, stride, padding, requested_dilation,
                                            groups);
  const std::vector<int64_t> dilation = effective_dilation(weight, requested_dilation);
  const auto format = conv_output_memory_format(input, weight);
  if (shape.N == 0) {  // nothing to compute (ATen's own CPU conv refuses an empty image even then)
    return at::empty({0, shape.K, shape.OH, shape.OW}, input.options().memory_format(format));
  }
  const auto direct = [&] {
    return conv2d_bias_act_direct(input, weight, bias, residual, stride, padding, dilation, groups, shape, format);
  };
  if (at::Tensor out = winograd_conv2d_bias_relu(input, weight, bias, residual, stride, padding, dilation, groups,
                                                 direct);
      out.defined()) {
    return out;
  }
  return direct();
}

at::Tensor conv2d_relu_cpu(const at::Tensor& input, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv2d_bias_act_cpu("conv2d_relu", input, weight, bias, at::Tensor(), stride, padding,
                             dilation, groups);
}

at::Tensor conv2d_add_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& residual,
                               const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv2d_bias_act_cpu("conv2d_add_relu", input, weight, bias, residual, stride, padding,
                             dilation, groups);
}

}  // namespace

// Backward: convolution_backward (oneDNN) ran tiny convs' input and weight gradients 1.3-3.4x slower
// than this (LeNet-5's: 172 vs 79 and 281 vs 136 us at batch 1, 274 vs 132 and 225 vs 173 at batch 4;
// benchmarks/results/2026-12-06_CPU-AMD-EPYC-2-threads_tiny-convs.txt).
std::tuple<at::Tensor, at::Tensor> tiny_conv_backward(const at::Tensor& grad, const at::Tensor& input,
                                                      const at::Tensor& weight, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      int64_t groups, bool input_grad, bool weight_grad) {
  if (!tiny_conv(input, weight, stride, padding, dilation, groups) || grad.scalar_type() != at::kFloat ||
      weight.scalar_type() != at::kFloat) {
    return {};
  }
  const auto grads_format = conv_output_memory_format(input, weight);  // as convolution_backward gives them
  const auto layout = tiny_layout(input, grads_format);
  auto [grad_input, grad_weight, grad_bias] = at::_slow_conv2d_backward(
      strided_as(grad, layout), strided_as(input, layout), strided_as(weight, layout), {weight.size(2), weight.size(3)},
      stride, padding, {input_grad, weight_grad, false});
  if (grad_input.defined()) grad_input = strided_as(grad_input, grads_format);
  if (grad_weight.defined()) grad_weight = strided_as(grad_weight, grads_format);
  tiny_runs.fetch_add(1, std::memory_order_relaxed);
  return {grad_input, grad_weight};
}

int64_t tiny_conv_runs() { return tiny_runs.load(std::memory_order_relaxed); }

bool conv_runs_in_fp32(at::ScalarType dtype) {
  return (dtype == at::kHalf && !cpu_runs_onednn_fp16()) || (dtype == at::kBFloat16 && !cpu_runs_onednn_bf16());
}

int64_t relu_post_op_conv_runs() { return relu_post_op_runs.load(std::memory_order_relaxed); }

std::tuple<at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad, const at::Tensor& input,
                                                 const at::Tensor& weight, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                 bool input_grad, bool weight_grad, bool values_readable) {
  bool in_fp32 = conv_runs_in_fp32(input.scalar_type());
  if (!in_fp32 && input.scalar_type() == at::kBFloat16) {  // only then the sizes: torch.compile may trace them symbolic
    const bool narrow = stride[1] > 1 &&
                        conv_output_memory_format(input, weight) == at::MemoryFormat::ChannelsLast &&
                        grad.sym_size(3) <= 2;
    in_fp32 = values_readable ? onednn_bf16_gets_wrong(narrow, {magnitude_bound(input), magnitude_bound(grad)}) : narrow;
  }
  const auto fp32 = [&](const at::Tensor& t) { return in_fp32 ? t.to(at::kFloat) : t; };
  auto [grad_input, grad_weight, grad_bias] = at::convolution_backward(
      fp32(grad), fp32(input), fp32(weight), c10::nullopt, stride, padding, dilation, /*transposed=*/false, {0, 0},
      groups, {input_grad, weight_grad, false});
  if (in_fp32 && grad_input.defined()) grad_input = grad_input.to(input.scalar_type());
  if (in_fp32 && grad_weight.defined()) grad_weight = grad_weight.to(weight.scalar_type());
  return {grad_input, grad_weight};
}

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("conv2d_relu", &conv2d_relu_cpu);
  m.impl("conv2d_add_relu", &conv2d_add_relu_cpu);
}

}  // namespace cnnkernels::cpu
