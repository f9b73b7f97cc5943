// The relu_backward_bias_grad kernels: the ReLU backward, grad_pre_relu = (output <= 0 ? 0 : grad)
// (aten.threshold_backward's rule: a NaN output passes grad through), fused with the bias gradient,
// grad_bias[c] = the sum of grad_pre_relu over N, H, W. relu_backward.cu launches them.
//
// One pass over memory: every thread reads its grad and output elements once (16-byte vectors when
// the rows or planes allow it), writes grad_pre_relu once, and keeps its channels' sums in registers.
// No float atomics, so the sums are bitwise deterministic: phase 1 (a layout kernel) writes one
// partial sum per (block of rows or plane chunk, channel) into an opmath workspace [P, C] after a
// shared-memory tree over the threads that share a channel; phase 2 (bias_grad_finalize_kernel)
// sums each workspace column in a fixed order. Every order depends only on the shape and the grid,
// and the grid (the *_launch helpers below) only on the shape and the multiprocessor count.
//
//  channels_last: storage is rows (n, h, w) of C channels. A block is tx_count vector columns
//                 (a strip of channels, kVec per thread) by kThreads / tx_count row lanes; the
//                 row blocks (grid.y) stride over the rows. Partial p = row block.
//  NCHW:          storage is planes (n, c) of H*W elements. A group of group_size threads sums a
//                 chunk of one plane (planes are split into chunks when there are too few to fill
//                 the GPU); a block holds kThreads / group_size groups and strides over the
//                 (plane, chunk) items. Partial p = n * chunks + chunk.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "common.cuh"

namespace cnnkernels::cuda::relu_bwd {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent loads in flight per operand and thread
constexpr int kBlocksPerSM = 2048 / kThreads;

// kVec elements loaded and stored as one access: 16 bytes for the vector path, 1 element otherwise.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
constexpr int vec16_size() {
  return static_cast<int>(16 / sizeof(T));
}

// aten.threshold_backward(grad, output, 0): `NaN <= 0` is false, so a NaN output passes grad.
template <typename T>
__device__ __forceinline__ T relu_grad(T grad, T output) {
  using acc_t = at::opmath_type<T>;
  return static_cast<acc_t>(output) <= acc_t(0) ? static_cast<T>(acc_t(0)) : grad;
}

// Sums values[tid] over the `lanes` threads tid = lane * stride + k (lanes a power of two) into
// lane 0's slot, pairwise in a fixed order. Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ void tree_sum(acc_t* values, int lane, int lanes, int stride) {
  for (int half = lanes / 2; half > 0; half /= 2) {
    __syncthreads();
    if (lane < half) values[threadIdx.x] += values[threadIdx.x + half * stride];
  }
}

// ---- channels_last ------------------------------------------------------------------------
// grad, output, grad_pre_relu: rows x C, dense. kVec > 1 needs C % kVec == 0 and 16-byte aligned
// pointers. partial: [gridDim.y, C]. blockDim.x == kThreads; tx_count a power of two <= 32.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
relu_backward_channels_last_kernel(const T* __restrict__ grad, const T* __restrict__ output,
                                   T* __restrict__ grad_pre_relu, at::opmath_type<T>* __restrict__ partial,
                                   int64_t rows, int64_t C, int tx_count) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, kVec>;
  const int tx = threadIdx.x % tx_count;
  const int ty = threadIdx.x / tx_count;
  const int ty_count = kThreads / tx_count;
  const int64_t row_vecs = C / kVec;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * tx_count + tx;  // in vectors
  const bool active = col < row_vecs;
  const P* g = reinterpret_cast<const P*>(grad);
  const P* o = reinterpret_cast<const P*>(output);
  P* r = reinterpret_cast<P*>(grad_pre_relu);

  acc_t acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = acc_t(0);
  const int64_t tile = static_cast<int64_t>(ty_count) * kUnroll;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.y) * tile; row0 < rows; row0 += tile * gridDim.y) {
    P gv[kUnroll], ov[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t row = row0 + static_cast<int64_t>(j) * ty_count + ty;
      if (active && row < rows) {
        gv[j] = g[row * row_vecs + col];
        ov[j] = o[row * row_vecs + col];
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t row = row0 + static_cast<int64_t>(j) * ty_count + ty;
      if (active && row < rows) {
        P out;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          out.v[e] = relu_grad(gv[j].v[e], ov[j].v[e]);
          acc[e] += static_cast<acc_t>(out.v[e]);
        }
        r[row * row_vecs + col] = out;
      }
    }
  }

  // Sum over the row lanes (threads tx, tx + tx_count, ...), one column of sums per vector element.
  __shared__ acc_t sums[kVec][kThreads];
#pragma unroll
  for (int e = 0; e < kVec; ++e) sums[e][threadIdx.x] = acc[e];
  for (int half = ty_count / 2; half > 0; half /= 2) {
    __syncthreads();
    if (ty < half) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) sums[e][threadIdx.x] += sums[e][threadIdx.x + half * tx_count];
    }
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) partial[static_cast<int64_t>(blockIdx.y) * C + col * kVec + e] = sums[e][tx];
  }
}

// ---- NCHW ---------------------------------------------------------------------------------
// grad, output, grad_pre_relu: planes x plane_size, dense, plane = n * C + c. kVec > 1 needs
// plane_size % kVec == 0 and 16-byte aligned pointers. A plane is `chunks` chunks of chunk_vecs
// vectors (the last one shorter). partial: [N * chunks, C]. group_size a power of two, 32..kThreads.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
relu_backward_nchw_kernel(const T* __restrict__ grad, const T* __restrict__ output,
                          T* __restrict__ grad_pre_relu, at::opmath_type<T>* __restrict__ partial,
                          int64_t planes, int64_t C, int64_t plane_size, int64_t chunks, int64_t chunk_vecs,
                          int group_size) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, kVec>;
  const int lane = threadIdx.x % group_size;
  const int group = threadIdx.x / group_size;
  const int groups = kThreads / group_size;
  const int64_t plane_vecs = plane_size / kVec;
  const int64_t items = planes * chunks;
  __shared__ acc_t sums[kThreads];

  // The loop bounds are the same for the whole block: every thread reaches tree_sum's barriers.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups; base < items;
       base += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t item = base + group;
    const int64_t plane = item / chunks;
    const int64_t chunk = item % chunks;
    acc_t acc = acc_t(0);
    if (item < items) {
      const P* g = reinterpret_cast<const P*>(grad) + plane * plane_vecs;
      const P* o = reinterpret_cast<const P*>(output) + plane * plane_vecs;
      P* r = reinterpret_cast<P*>(grad_pre_relu) + plane * plane_vecs;
      const int64_t begin = chunk * chunk_vecs;
      const int64_t end = begin + chunk_vecs < plane_vecs ? begin + chunk_vecs : plane_vecs;
      for (int64_t i0 = begin + lane; i0 < end; i0 += static_cast<int64_t>(group_size) * kUnroll) {
        P gv[kUnroll], ov[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
          const int64_t i = i0 + static_cast<int64_t>(j) * group_size;
          if (i < end) {
            gv[j] = g[i];
            ov[j] = o[i];
          }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
          const int64_t i = i0 + static_cast<int64_t>(j) * group_size;
          if (i < end) {
            P out;
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              out.v[e] = relu_grad(gv[j].v[e], ov[j].v[e]);
              acc += static_cast<acc_t>(out.v[e]);
            }
            r[i] = out;
          }
        }
      }
    }
    sums[threadIdx.x] = acc;
    tree_sum(sums, lane, group_size, 1);
    if (lane == 0 && item < items) {
      const int64_t n = plane / C;
      const int64_t c = plane % C;
      partial[(n * chunks + chunk) * C + c] = sums[threadIdx.x];
    }
    __syncthreads();  // sums is refilled by the next item
  }
}

// ---- phase 2 ------------------------------------------------------------------------------
// grad_bias[c] = sum over p of partial[p, c]: tx_count channels (a power of two <= 8: one 32-byte
// sector of floats per row) by kThreads / tx_count lanes that stride over p, kUnroll loads in
// flight and added in p order, then a tree over the lanes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
bias_grad_finalize_kernel(const at::opmath_type<T>* __restrict__ partial, int64_t num_partials, int64_t C,
                          T* __restrict__ grad_bias, int tx_count) {
  using acc_t = at::opmath_type<T>;
  const int tx = threadIdx.x % tx_count;
  const int ty = threadIdx.x / tx_count;
  const int ty_count = kThreads / tx_count;
  __shared__ acc_t sums[kThreads];
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * tx_count; c0 < C;
       c0 += static_cast<int64_t>(gridDim.x) * tx_count) {
    const int64_t c = c0 + tx;
    acc_t acc = acc_t(0);
    if (c < C) {
      for (int64_t p0 = ty; p0 < num_partials; p0 += static_cast<int64_t>(ty_count) * kUnroll) {
        acc_t v[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
          const int64_t p = p0 + static_cast<int64_t>(j) * ty_count;
          v[j] = p < num_partials ? partial[p * C + c] : acc_t(0);
        }
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) acc += v[j];
      }
    }
    sums[threadIdx.x] = acc;
    tree_sum(sums, ty, ty_count, tx_count);
    if (ty == 0 && c < C) grad_bias[c] = static_cast<T>(sums[tx]);
    __syncthreads();  // sums is refilled by the next channel tile
  }
}

// ---- launch geometry (host; shared with the CPU emulation test) ----------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= x, clamped to [lo, hi] (lo, hi powers of two).
inline int pow2_at_least(int64_t x, int lo, int hi) {
  int p = lo;
  while (p < hi && p < x) p *= 2;
  return p;
}

// Threads on tx_count columns of width vec (a strip of channels), enough row blocks to give the
// GPU max_blocks blocks in all, no more than the rows need.
struct ChannelsLastLaunch {
  int tx_count;
  int64_t strips, row_blocks;  // grid.x, grid.y; row_blocks is the number of partials
};
inline ChannelsLastLaunch channels_last_launch(int64_t rows, int64_t C, int vec, int64_t max_blocks) {
  ChannelsLastLaunch l{};
  const int64_t row_vecs = C / vec;
  l.tx_count = pow2_at_least(row_vecs, 1, 32);
  l.strips = ceil_div(row_vecs, l.tx_count);
  const int64_t wanted = ceil_div(rows, int64_t{kThreads / l.tx_count} * kUnroll);
  const int64_t budget = max_blocks / l.strips > 1 ? max_blocks / l.strips : 1;
  l.row_blocks = wanted < budget ? wanted : budget;
  if (l.row_blocks > 65535) l.row_blocks = 65535;  // grid.y limit; the row loop covers the rest
  return l;
}

// Groups of group_size threads, sized to the plane (one unrolled step covers a short plane);
// planes split into chunks when N * C groups would leave the GPU's threads idle.
struct NchwLaunch {
  int group_size;
  int64_t chunks, chunk_vecs, blocks;  // partials: N * chunks
};
inline NchwLaunch nchw_launch(int64_t planes, int64_t plane_size, int vec, int64_t max_blocks) {
  NchwLaunch l{};
  const int64_t plane_vecs = plane_size / vec;
  l.group_size = pow2_at_least(ceil_div(plane_vecs, kUnroll), 32, kThreads);
  const int64_t wanted_chunks = ceil_div(max_blocks * kThreads, planes * l.group_size);
  const int64_t max_chunks = plane_vecs / (int64_t{l.group_size} * kUnroll);  // each a full step at least
  const int64_t chunks = wanted_chunks < max_chunks ? wanted_chunks : max_chunks;
  l.chunk_vecs = ceil_div(plane_vecs, chunks > 1 ? chunks : 1);
  l.chunks = ceil_div(plane_vecs, l.chunk_vecs);
  const int64_t wanted_blocks = ceil_div(planes * l.chunks, kThreads / l.group_size);
  l.blocks = wanted_blocks < max_blocks ? wanted_blocks : max_blocks;
  return l;
}

inline int finalize_tx_count(int64_t C) { return pow2_at_least(C, 1, 8); }

}  // namespace cnnkernels::cuda::relu_bwd
