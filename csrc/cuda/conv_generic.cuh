// The generic CUDA conv + bias (+ residual) + ReLU: correct for every float dtype and every
// geometry (any kernel size, stride, padding, dilation, groups) and any tensor strides. It is the
// fallback for whatever the CUTLASS fast path does not take, and the path for fp32 and fp64.
//
// Two kernels:
//  - conv_igemm_kernel: implicit GEMM on CUDA cores. Per group, C[M x Kg] = A[M x Kred] B[Kred x Kg]
//    with M = N*OH*OW output pixels, Kg output channels, Kred = Cg*R*S taps ordered (r, s, c),
//    c fastest, so that an NHWC input is read along its contiguous channels. A 64x64 output tile
//    per block, BK = 16, tiles staged through shared memory with the next tile prefetched into
//    registers, 4x4 results per thread, accumulation in float (double for double).
//  - conv_direct_kernel: one output element per thread, for Cg == 1 (depthwise), where a GEMM tile
//    would be almost all padding.
// Both finish with the fused epilogue: + bias[k] + residual, ReLU (NaN passes), cast, store.
// Every offset is int64; tensors are addressed through their strides.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace cnnkernels::cuda {

struct GenericConvParams {
  int64_t M;  // N * OH * OW
  int N, C, H, W, K, R, S, OH, OW;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int groups, Cg, Kg, Kred;  // Kred = Cg * R * S
  Strides4 in, wt, res, out;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_epilogue(const GenericConvParams& p, acc_t v, int n, int k, int oh,
                                               int ow, const scalar_t* __restrict__ bias,
                                               const scalar_t* __restrict__ residual,
                                               scalar_t* __restrict__ out) {
  if (bias != nullptr) v += static_cast<acc_t>(bias[k]);
  if (residual != nullptr) {
    v += static_cast<acc_t>(residual[n * p.res.n + k * p.res.c + oh * p.res.h + ow * p.res.w]);
  }
  out[n * p.out.n + k * p.out.c + oh * p.out.h + ow * p.out.w] = static_cast<scalar_t>(relu(v));
}

namespace igemm {
constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
constexpr int kThreadsN = BN / TN;               // 16 threads across the tile's columns
constexpr int kThreads = (BM / TM) * kThreadsN;  // 256
constexpr int kRowsPerPass = kThreads / BK;      // 16 rows (or columns) loaded per pass
constexpr int kLoadsA = BM / kRowsPerPass;       // 4 input elements per thread and tile
constexpr int kLoadsB = BN / kRowsPerPass;       // 4 weights per thread and tile
constexpr int kPad = 1;                          // breaks the stride-BM bank pattern of the stores
}  // namespace igemm

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(igemm::kThreads)
conv_igemm_kernel(const GenericConvParams p, const scalar_t* __restrict__ input,
                  const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                  const scalar_t* __restrict__ residual, scalar_t* __restrict__ out) {
  using namespace igemm;
  __shared__ acc_t As[BK][BM + kPad];
  __shared__ acc_t Bs[BK][BN + kPad];

  const int tid = threadIdx.x;
  const int k_lane = tid % BK;       // which tap of the BK-slice this thread loads
  const int load_row = tid / BK;     // first tile row (A) or column (B) this thread loads
  const int tx = tid % kThreadsN;    // compute: columns tx + j * kThreadsN
  const int ty = tid / kThreadsN;    // compute: rows ty + i * (BM / TM)
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t pixels = static_cast<int64_t>(p.OH) * p.OW;

  // The output pixels whose input rows this thread loads: fixed for the whole block.
  int64_t a_base[kLoadsA];
  int a_ih[kLoadsA], a_iw[kLoadsA];
  bool a_valid[kLoadsA];
#pragma unroll
  for (int q = 0; q < kLoadsA; ++q) {
    const int64_t m = m0 + load_row + q * kRowsPerPass;
    a_valid[q] = m < p.M;
    const int64_t mm = a_valid[q] ? m : 0;
    const int n = static_cast<int>(mm / pixels);
    const int64_t rem = mm - n * pixels;
    const int oh = static_cast<int>(rem / p.OW), ow = static_cast<int>(rem % p.OW);
    a_base[q] = n * p.in.n;
    a_ih[q] = oh * p.stride_h - p.pad_h;
    a_iw[q] = ow * p.stride_w - p.pad_w;
  }

  const int n_tiles = (p.Kg + BN - 1) / BN;
  for (int gy = blockIdx.y; gy < p.groups * n_tiles; gy += gridDim.y) {
    const int g = gy / n_tiles;
    const int col0 = (gy - g * n_tiles) * BN;  // first output channel of this tile, within group g
    const scalar_t* in_g = input + static_cast<int64_t>(g) * p.Cg * p.in.c;
    const scalar_t* wt_g = weight + static_cast<int64_t>(g) * p.Kg * p.wt.n;

    acc_t a_reg[kLoadsA], b_reg[kLoadsB];
    auto load_tile = [&](int k0) {
      const int k = k0 + k_lane;
      const bool k_valid = k < p.Kred;
      int c = 0, r = 0, s = 0;
      if (k_valid) {
        c = k % p.Cg;
        const int rs = k / p.Cg;
        r = rs / p.S;
        s = rs - r * p.S;
      }
      const int dh = r * p.dil_h, dw = s * p.dil_w;
      const int64_t c_off = c * p.in.c;
#pragma unroll
      for (int q = 0; q < kLoadsA; ++q) {
        const int ih = a_ih[q] + dh, iw = a_iw[q] + dw;
        const bool ok = k_valid && a_valid[q] && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
        a_reg[q] = ok ? static_cast<acc_t>(in_g[a_base[q] + c_off + ih * p.in.h + iw * p.in.w]) : acc_t(0);
      }
      const int64_t w_off = c * p.wt.c + r * p.wt.h + s * p.wt.w;
#pragma unroll
      for (int q = 0; q < kLoadsB; ++q) {
        const int col = col0 + load_row + q * kRowsPerPass;
        b_reg[q] = (k_valid && col < p.Kg) ? static_cast<acc_t>(wt_g[col * p.wt.n + w_off]) : acc_t(0);
      }
    };
    auto store_tile = [&]() {
#pragma unroll
      for (int q = 0; q < kLoadsA; ++q) As[k_lane][load_row + q * kRowsPerPass] = a_reg[q];
#pragma unroll
      for (int q = 0; q < kLoadsB; ++q) Bs[k_lane][load_row + q * kRowsPerPass] = b_reg[q];
    };

    acc_t acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

    load_tile(0);
    store_tile();
    __syncthreads();
    for (int k0 = 0; k0 < p.Kred; k0 += BK) {
      const bool has_next = k0 + BK < p.Kred;
      if (has_next) load_tile(k0 + BK);  // global loads in flight during the math below
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        acc_t a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[kk][ty + i * (BM / TM)];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tx + j * kThreadsN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
      if (has_next) {
        store_tile();
        __syncthreads();
      }
    }

    // Neighbouring threads hold neighbouring output channels: coalesced stores for channels_last.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t m = m0 + ty + i * (BM / TM);
      if (m >= p.M) continue;
      const int n = static_cast<int>(m / pixels);
      const int64_t rem = m - n * pixels;
      const int oh = static_cast<int>(rem / p.OW), ow = static_cast<int>(rem % p.OW);
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int col = col0 + tx + j * kThreadsN;
        if (col < p.Kg) store_epilogue(p, acc[i][j], n, g * p.Kg + col, oh, ow, bias, residual, out);
      }
    }
  }
}

// Cg == 1: output channel k reads input channel k / Kg only. One output element per thread,
// visited in the output's storage order (channels fastest for channels_last).
template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(256)
conv_direct_kernel(const GenericConvParams p, const scalar_t* __restrict__ input,
                   const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                   const scalar_t* __restrict__ residual, scalar_t* __restrict__ out) {
  const int64_t total = p.M * p.K;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int n, k, oh, ow;
    int64_t t = idx;
    if (kChannelsLast) {
      k = static_cast<int>(t % p.K); t /= p.K;
      ow = static_cast<int>(t % p.OW); t /= p.OW;
      oh = static_cast<int>(t % p.OH); t /= p.OH;
    } else {
      ow = static_cast<int>(t % p.OW); t /= p.OW;
      oh = static_cast<int>(t % p.OH); t /= p.OH;
      k = static_cast<int>(t % p.K); t /= p.K;
    }
    n = static_cast<int>(t);
    const scalar_t* in = input + n * p.in.n + static_cast<int64_t>(k / p.Kg) * p.in.c;
    const scalar_t* wt = weight + k * p.wt.n;
    acc_t acc = acc_t(0);
    for (int r = 0; r < p.R; ++r) {
      const int ih = oh * p.stride_h - p.pad_h + r * p.dil_h;
      if (ih < 0 || ih >= p.H) continue;
      for (int s = 0; s < p.S; ++s) {
        const int iw = ow * p.stride_w - p.pad_w + s * p.dil_w;
        if (iw < 0 || iw >= p.W) continue;
        acc = fma(static_cast<acc_t>(in[ih * p.in.h + iw * p.in.w]),
                  static_cast<acc_t>(wt[r * p.wt.h + s * p.wt.w]), acc);
      }
    }
    store_epilogue(p, acc, n, k, oh, ow, bias, residual, out);
  }
}

}  // namespace cnnkernels::cuda
