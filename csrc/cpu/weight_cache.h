// Weights prepared once per weight tensor and geometry (oneDNN's blocked layout, Winograd's
// transformed forms) and reused while the weight's bytes are unchanged.
#pragma once
#include <ATen/ATen.h>

#include <functional>

namespace cnnkernels::cpu {

enum class WeightForm { kOneDnnBlocked, kWinograd, kWinogradInputGrad };

struct PreparedWeight {
  at::Tensor tensor;      // what make() returned (it may be undefined: make() found w unusable)
  bool changing = false;  // w changed since the last call with this key: nothing was prepared
};

// make() prepares `w` in this form for this geometry (pass empty lists where the form does not
// depend on it). The result, an undefined one too, is cached next to a fingerprint of the
// weight's bytes and used only while the weight's bytes still give that fingerprint: a version
// counter would not do, since writes through `.data` do not bump it. The fingerprint (64 bits,
// weight_cache.cpp) changes with any one changed 8-byte word of the weight, and with any other
// change but with a chance of about 2^-64 of missing it. Checking it costs one read of the
// weight per call; comparing with a copy cost two (0.43 ms for an 8 MB weight beside a 1.9 ms
// conv, 15% of ResNet-50's forward at batch 1 on 2 cores).
// A weight whose bytes changed since the last call (an optimizer steps it between calls) comes
// back `changing`, unprepared: preparing it on every call would cost more than it saves. Its
// fingerprint is updated, so that once it stops changing, the next call prepares and caches it
// again. Weights that are not dense are prepared on each call.
// CNNKERNELS_CPU_WEIGHT_CACHE_MB bounds what the cache holds (its prepared weights, least
// recently used dropped first); 0 turns it off. Default 1024 MB.
PreparedWeight prepared_weight(WeightForm form, const at::Tensor& w, at::IntArrayRef input_sizes,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, const std::function<at::Tensor()>& make);

}  // namespace cnnkernels::cpu
