// The add_relu kernels: relu(a + b) with 16-byte loads and stores, grid-stride loops, int64
// offsets. add_relu.cu launches them.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "common.cuh"

namespace cnnkernels::cuda {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent 16-byte loads in flight per operand and thread

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ T add_relu_one(T a, T b) {
  using acc_t = at::opmath_type<T>;
  return static_cast<T>(relu(static_cast<acc_t>(a) + static_cast<acc_t>(b)));
}

// All three pointers 16-byte aligned. Vectors first, then the < kSize tail by block 0.
template <typename T>
__global__ void __launch_bounds__(kThreads)
add_relu_vec16_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  using V = Vec16<T>;
  const int64_t n_vec = n / V::kSize;
  const V* va = reinterpret_cast<const V*>(a);
  const V* vb = reinterpret_cast<const V*>(b);
  V* vo = reinterpret_cast<V*>(out);
  const int64_t tile = static_cast<int64_t>(blockDim.x) * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * tile; base < n_vec;
       base += static_cast<int64_t>(gridDim.x) * tile) {
    V x[kUnroll], y[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (i < n_vec) {
        x[j] = va[i];
        y[j] = vb[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + j * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (i < n_vec) {
        V r;
#pragma unroll
        for (int e = 0; e < V::kSize; ++e) r.v[e] = add_relu_one(x[j].v[e], y[j].v[e]);
        vo[i] = r;
      }
    }
  }
  if (blockIdx.x == 0) {
    const int64_t i = n_vec * V::kSize + threadIdx.x;
    if (i < n) out[i] = add_relu_one(a[i], b[i]);
  }
}

// Any alignment (a dense view that starts mid-vector): one element per step.
template <typename T>
__global__ void __launch_bounds__(kThreads)
add_relu_scalar_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = add_relu_one(a[i], b[i]);
  }
}

}  // namespace cnnkernels::cuda
