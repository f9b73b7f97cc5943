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
  int M;  // N * OH * OW rows, below 2^31 (conv.cu checks)
  int C, H, W, R, S, OH, OW;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int Kred, Kpad;  // C * R * S taps, (r, s, c) with c fastest; the row length, Kred rounded up
  Strides4 in;
};

constexpr int kPackMaxThreads = 256;

// A block's threads span a row's columns (consecutive threads write consecutive columns, so the
// stores coalesce) and the block walks rows in a grid-stride loop. A thread's column, and so its
// tap and channel, is the same for every row: only the row's (n, oh, ow) is worked out per row,
// in 32-bit arithmetic. (One element per thread with int64 index math ran the RGB 7x7 stem of
// ResNet-50 at batch 64 in about 1.07 ms with the GEMM on the first H200 try, 2x cuDNN's conv.)
template <typename T>
__global__ void __launch_bounds__(kPackMaxThreads)
pack_windows_kernel(const PackWindowsParams p, const T* __restrict__ input, T* __restrict__ cols) {
  const int plane = p.OH * p.OW;
  for (int col = threadIdx.x; col < p.Kpad; col += blockDim.x) {
    const bool tap = col < p.Kred;
    const int rs = col / p.C, c = col - rs * p.C;
    const int r = rs / p.S, s = rs - r * p.S;
    const int dh = r * p.dil_h - p.pad_h, dw = s * p.dil_w - p.pad_w;
    const int64_t channel = static_cast<int64_t>(c) * p.in.c;
    for (int row = blockIdx.x; row < p.M; row += gridDim.x) {
      const int n = row / plane, pixel = row - n * plane;
      const int oh = pixel / p.OW, ow = pixel - oh * p.OW;
      const int ih = oh * p.stride_h + dh, iw = ow * p.stride_w + dw;
      T v = T(0);
      if (tap && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
        v = input[n * p.in.n + channel + ih * p.in.h + iw * p.in.w];
      }
      cols[static_cast<int64_t>(row) * p.Kpad + col] = v;
    }
  }
}

}  // namespace cnnkernels::cuda
