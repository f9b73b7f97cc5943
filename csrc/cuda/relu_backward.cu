// relu_backward_bias_grad on CUDA: grad_pre_relu = (output <= 0 ? 0 : grad) and grad_bias = its
// sum over N, H, W, in one pass over grad and output (relu_backward.cuh says how), then a small
// deterministic reduction of the per-block partial sums. Nothing syncs with the host and the only
// allocations go through the caching allocator, so it can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../conv_args.h"
#include "common.cuh"
#include "relu_backward.cuh"

namespace cnnkernels::cuda {
namespace {

using namespace relu_bwd;

// Phase 1 for one layout and vector width; returns the partial sums [P, C].
template <typename T, int kVec>
at::Tensor launch_phase1(const T* grad, const T* output, T* grad_pre_relu, bool channels_last, int64_t N,
                         int64_t C, int64_t plane_size, const at::TensorOptions& acc_options,
                         int64_t max_blocks, cudaStream_t stream) {
  using acc_t = at::opmath_type<T>;
  if (channels_last) {
    const ChannelsLastLaunch l = channels_last_launch(N * plane_size, C, kVec, max_blocks);
    at::Tensor partial = at::empty({l.row_blocks, C}, acc_options);
    const dim3 grid(static_cast<unsigned>(l.strips), static_cast<unsigned>(l.row_blocks));
    relu_backward_channels_last_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(
        grad, output, grad_pre_relu, partial.mutable_data_ptr<acc_t>(), N * plane_size, C, l.tx_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return partial;
  }
  const NchwLaunch l = nchw_launch(N * C, plane_size, kVec, max_blocks);
  at::Tensor partial = at::empty({N * l.chunks, C}, acc_options);
  relu_backward_nchw_kernel<T, kVec><<<static_cast<unsigned>(l.blocks), kThreads, 0, stream>>>(
      grad, output, grad_pre_relu, partial.mutable_data_ptr<acc_t>(), N * C, C, plane_size, l.chunks,
      l.chunk_vecs, l.group_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

std::tuple<at::Tensor, at::Tensor> relu_backward_bias_grad_cuda(const at::Tensor& grad,
                                                                const at::Tensor& output) {
  check_relu_backward_args(grad, output);
  c10::cuda::CUDAGuard guard(output.device());
  // grad_pre_relu takes output's memory format (what the fake kernel promises); operands already
  // dense in it are read in place, the others copied into it once.
  const auto format = output.suggest_memory_format();
  const at::Tensor g = grad.contiguous(format);
  const at::Tensor o = output.contiguous(format);
  at::Tensor grad_pre_relu = at::empty(o.sizes(), g.options().memory_format(format));
  const int64_t N = o.size(0), C = o.size(1), plane_size = o.size(2) * o.size(3);
  if (o.numel() == 0) return {grad_pre_relu, at::zeros({C}, g.options())};
  at::Tensor grad_bias = at::empty({C}, g.options());

  // H * W == 1: NCHW storage is the channels_last one (N rows of C channels), and its better kernel.
  const bool channels_last = format == at::MemoryFormat::ChannelsLast || plane_size == 1;
  const int64_t max_blocks = int64_t{multiprocessor_count()} * kBlocksPerSM;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "relu_backward_bias_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec16_size<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* po = o.const_data_ptr<scalar_t>();
    scalar_t* pr = grad_pre_relu.mutable_data_ptr<scalar_t>();
    const at::TensorOptions acc_options = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    // 16-byte accesses need aligned pointers and rows (planes) a whole number of vectors long.
    const bool vec = is_aligned(pg, 16) && is_aligned(po, 16) && is_aligned(pr, 16) &&
                     (channels_last ? C : plane_size) % kVec == 0;
    const at::Tensor partial =
        vec ? launch_phase1<scalar_t, kVec>(pg, po, pr, channels_last, N, C, plane_size, acc_options,
                                            max_blocks, stream)
            : launch_phase1<scalar_t, 1>(pg, po, pr, channels_last, N, C, plane_size, acc_options,
                                         max_blocks, stream);
    const int tx_count = finalize_tx_count(C);
    const int64_t blocks = std::min(ceil_div(C, tx_count), max_blocks);
    bias_grad_finalize_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), partial.size(0), C, grad_bias.mutable_data_ptr<scalar_t>(), tx_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_pre_relu, grad_bias};
}

}  // namespace
}  // namespace cnnkernels::cuda

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("relu_backward_bias_grad", &cnnkernels::cuda::relu_backward_bias_grad_cuda);
}
