// Conv + bias (+ residual) + ReLU on the CPU. 3x3 stride-1 fp32 convs with enough channels run
// through Winograd with the epilogue fused (winograd.cpp). Others: the convolution with its
// bias, then one fused residual+ReLU pass in place. The convolution is oneDNN's
// (mkldnn::_convolution_pointwise, the primitive PyTorch's own CPU fusion uses) where PyTorch
// ships it, else ATen's.
// oneDNN's fused ReLU post-op is not used because it turns NaN into 0 (measured here with
// torch 2.14.1), where torch.relu keeps NaN.
//
// For channels_last input, the weight is handed to oneDNN already reordered into its blocked
// layout, which saves 1.1-2.3x on layers with large weights and small images (measured at
// batch 4, fp32). Reordered weights, and Winograd's transformed ones, are cached per weight
// tensor and geometry, next to a copy
// of the weight's bytes: an entry is used only while the weight's bytes still equal that copy.
// A version counter would not do: writes through `.data` do not bump it. Comparing costs a read
// of the weight twice, a small part of what the reorder costs.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <tuple>

#include "../conv_args.h"
#include "elementwise.h"
#include "winograd.h"

namespace cnnkernels::cpu {
namespace {

c10::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

at::Tensor conv_onednn(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  static const auto op = find_op("mkldnn::_convolution_pointwise", "");
  const c10::IValue none;
  torch::jit::Stack stack{x, w, (bias.has_value() && bias->defined()) ? c10::IValue(*bias) : none,
                          padding.vec(), stride.vec(), dilation.vec(), groups, std::string("none"),
                          c10::List<c10::optional<at::Scalar>>(), none};
  op->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// Forms of a weight prepared once and reused while the weight's bytes are unchanged.
enum class WeightForm { kOneDnnBlocked, kWinograd };

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

class PreparedWeightCache {
 public:
  // make() prepares `w` for this form and geometry; its result is cached (an undefined result
  // too) while the weight's bytes still equal the copy kept beside it. Weights that are not
  // dense are prepared on each call.
  template <typename Make>
  at::Tensor get(WeightForm form, const at::Tensor& w, at::IntArrayRef input_sizes, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const Make& make) {
    if (!w.is_non_overlapping_and_dense() || capacity_bytes() == 0) return make();
    const Key key{form, w.unsafeGetTensorImpl(), w.scalar_type(), w.sizes().vec(), w.strides().vec(),
                  input_sizes.vec(), stride.vec(), padding.vec(), dilation.vec(), groups};
    const auto bytes = static_cast<size_t>(w.numel()) * w.element_size();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (it->key != key) continue;
        if (std::memcmp(it->weight_copy.const_data_ptr(), w.const_data_ptr(), bytes) == 0) {
          entries_.splice(entries_.begin(), entries_, it);  // most recently used first
          return it->prepared;
        }
        held_bytes_ -= 2 * bytes;
        entries_.erase(it);
        break;
      }
    }
    at::Tensor prepared = make();
    Entry entry{key, w.clone(at::MemoryFormat::Preserve), prepared};
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_front(std::move(entry));
    held_bytes_ += 2 * bytes;
    while (held_bytes_ > capacity_bytes() && !entries_.empty()) {
      const auto& last = entries_.back().weight_copy;
      held_bytes_ -= 2 * static_cast<size_t>(last.numel()) * last.element_size();
      entries_.pop_back();
    }
    return prepared;
  }

 private:
  using Key = std::tuple<WeightForm, const void*, at::ScalarType, std::vector<int64_t>, std::vector<int64_t>,
                         std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                         std::vector<int64_t>, int64_t>;
  struct Entry {
    Key key;
    at::Tensor weight_copy;  // the bytes the reordered weight was made from
    at::Tensor prepared;
  };

  // CNNKERNELS_CPU_WEIGHT_CACHE_MB bounds what the cache holds (copies and reordered
  // weights together); 0 turns it off. Default 1024 MB.
  static size_t capacity_bytes() {
    static const size_t capacity = [] {
      const char* value = std::getenv("CNNKERNELS_CPU_WEIGHT_CACHE_MB");
      return static_cast<size_t>(value ? std::atoll(value) : 1024) << 20;
    }();
    return capacity;
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  size_t held_bytes_ = 0;
};

PreparedWeightCache& prepared_weights() {
  // Never destroyed: tensors must not be freed by static destructors at exit, after the
  // libraries that own their memory may already be gone.
  static auto* cache = new PreparedWeightCache();
  return *cache;
}

// PyTorch's oneDNN takes bf16 only on CPUs with AVX-512 BW/VL/DQ (mkldnn_bf16_device_check).
bool cpu_runs_onednn_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

// Whether oneDNN runs this conv. Not for a single small image with small kernels: there ATen's
// own kernel is several times faster than setting up a oneDNN primitive (14 vs 43 us for
// 1x4x8x8, 3x3), which is ATen's own rule for choosing oneDNN (use_mkldnn in Convolution.cpp).
bool onednn_takes(const at::Tensor& x, const at::Tensor& w, int64_t groups) {
  static const bool have_op = at::hasMKLDNN() && find_op("mkldnn::_convolution_pointwise", "").has_value() &&
                              find_op("mkldnn::_reorder_convolution_weight", "").has_value();
  const bool dtype_ok = x.scalar_type() == at::kFloat ||
                        (x.scalar_type() == at::kBFloat16 && cpu_runs_onednn_bf16());
  const bool small = x.size(0) == 1 && groups == 1 && !(w.size(2) > 3 && w.size(3) > 3) && x.numel() <= 20480;
  return have_op && dtype_ok && !small;
}

at::Tensor conv2d_bias_act_cpu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  check_conv2d_args(op, input, weight, bias, residual, stride, padding, dilation, groups);
  const auto format = output_memory_format(input);
  if (winograd_takes(input, weight, stride, padding, dilation, groups)) {
    const at::Tensor u = prepared_weights().get(WeightForm::kWinograd, weight, {}, {}, {}, {}, 1,
                                                [&] { return winograd_weight(weight); });
    if (u.defined()) {
      // Winograd runs in channels_last. For NCHW, converting the input and the output costs two
      // copies and still runs 2-3x faster than the direct NCHW conv (64 channels at 56x56, batch 4).
      const auto cl = at::MemoryFormat::ChannelsLast;
      const at::Tensor out = winograd_conv3x3(input.contiguous(cl), u, bias,
                                              residual.defined() ? residual.contiguous(cl) : residual,
                                              padding[0], padding[1]);
      if (out.defined()) return out.contiguous(format);
      // else the input holds values the transforms cannot take: the direct path below.
    }
  }

  const at::Tensor x = input.contiguous(format);
  // oneDNN computes in channels_last when either operand is: an NCHW input needs an NCHW
  // weight for its output to come out NCHW. A channels_last input takes either weight as is.
  const at::Tensor w = format == at::MemoryFormat::Contiguous ? weight.contiguous() : weight;
  const at::Tensor r = residual.defined() ? residual.contiguous(format) : residual;

  at::Tensor out;
  if (onednn_takes(x, w, groups)) {
    // A reordered weight makes oneDNN compute in channels_last: only for channels_last input.
    const at::Tensor onednn_weight = format == at::MemoryFormat::ChannelsLast
        ? prepared_weights().get(WeightForm::kOneDnnBlocked, w, x.sizes(), stride, padding, dilation,
                                 groups, [&] { return reorder_for_onednn(w, x.sizes(), stride, padding,
                                                                         dilation, groups); })
        : w;
    out = conv_onednn(x, onednn_weight, bias, stride, padding, dilation, groups);
  } else {
    out = at::convolution(x, w, bias, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups);
  }
  out = out.contiguous(format);
  add_relu_dense(out, r, out);
  return out;
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

TORCH_LIBRARY_IMPL(cnnkernels, CPU, m) {
  m.impl("conv2d_relu", &conv2d_relu_cpu);
  m.impl("conv2d_add_relu", &conv2d_add_relu_cpu);
}

}  // namespace cnnkernels::cpu
