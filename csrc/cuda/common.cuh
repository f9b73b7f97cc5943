// Small pieces shared by the CUDA kernels of this folder.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>

namespace cnnkernels::cuda {

struct Strides4 {
  int64_t n, c, h, w;  // for a weight: k, c, r, s
};

// `x < 0` is false for NaN, so NaN passes through as torch.relu lets it.
template <typename T>
__device__ __forceinline__ T relu(T x) {
  return x < T(0) ? T(0) : x;
}

inline int multiprocessor_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;  // cached by torch: no sync
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace cnnkernels::cuda
