// relu(input + other) on CUDA in one pass over storage order: 16-byte loads and stores,
// grid-stride loops, int64 offsets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../conv_args.h"
#include "add_relu.cuh"
#include "common.cuh"

namespace cnnkernels::cuda {
namespace {

// Enough blocks to fill the GPU, no more: the grid-stride loops cover the rest.
int grid_for(int64_t work_items_per_block_step, int64_t n_items) {
  const int64_t wanted = (n_items + work_items_per_block_step - 1) / work_items_per_block_step;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * (2048 / kThreads);
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

at::Tensor add_relu_cuda(const at::Tensor& input, const at::Tensor& other) {
  check_add_relu_args(input, other);
  // The output laid out as torch lays out relu(input + other); operands already laid out so
  // are read in place, the others copied so once.
  at::Tensor out = empty_add_relu_output(input, other);
  const at::Tensor a = laid_out_as(input, out), b = laid_out_as(other, out);
  const int64_t n = a.numel();
  if (n == 0) return out;

  c10::cuda::CUDAGuard guard(a.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "add_relu_cuda", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (is_aligned(pa, 16) && is_aligned(pb, 16) && is_aligned(po, 16)) {
      const int64_t n_vec = n / Vec16<scalar_t>::kSize;
      add_relu_vec16_kernel<scalar_t>
          <<<grid_for(int64_t{kThreads} * kUnroll, n_vec), kThreads, 0, stream>>>(pa, pb, po, n);
    } else {
      add_relu_scalar_kernel<scalar_t><<<grid_for(kThreads, n), kThreads, 0, stream>>>(pa, pb, po, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cnnkernels::cuda

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) { m.impl("add_relu", &cnnkernels::cuda::add_relu_cuda); }
