// Packs a conv's input windows as the rows of a GEMM operand, channels_last:
//   cols[(n, oh, ow), (r, s, c)] = input[n, c, oh * stride - pad + r * dil, ow * stride - pad + s * dil]
// with zeros for taps outside the image and for the columns past C*R*S (up to Kpad, a multiple of
// 8 for TMA). conv.cu runs a stem conv (few input channels, e.g. RGB) this way, as a 1x1 conv over
// Kpad channels: the CUTLASS kernel otherwise pads each tap's channels to 8 and spends a 64-wide
// channel tile on each tap, 3 real channels of 64 for an RGB stem.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace cnnkernels::cuda {

struct PackWindowsParams {
  int64_t M;  // N * OH * OW rows
  int C, H, W, R, S, OH, OW;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int Kred, Kpad;  // C * R * S taps, (r, s, c) with c fastest; the row length, Kred rounded up
  Strides4 in;
};

constexpr int kPackThreads = 256;

// One element per thread and step of a grid-stride loop; consecutive threads write consecutive
// columns of a row, so the stores coalesce.
template <typename T>
__global__ void __launch_bounds__(kPackThreads)
pack_windows_kernel(const PackWindowsParams p, const T* __restrict__ input, T* __restrict__ cols) {
  const int64_t total = p.M * p.Kpad;
  const int64_t plane = static_cast<int64_t>(p.OH) * p.OW;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.Kpad;
    const int col = static_cast<int>(i - row * p.Kpad);
    T v = T(0);
    if (col < p.Kred) {
      const int rs = col / p.C, c = col - rs * p.C;
      const int r = rs / p.S, s = rs - r * p.S;
      const int64_t n = row / plane;
      const int pixel = static_cast<int>(row - n * plane);
      const int oh = pixel / p.OW, ow = pixel - oh * p.OW;
      const int ih = oh * p.stride_h - p.pad_h + r * p.dil_h;
      const int iw = ow * p.stride_w - p.pad_w + s * p.dil_w;
      if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
        v = input[n * p.in.n + c * p.in.c + ih * p.in.h + iw * p.in.w];
      }
    }
    cols[i] = v;
  }
}

}  // namespace cnnkernels::cuda
