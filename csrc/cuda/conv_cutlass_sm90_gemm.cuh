// The 1x1 path of the "cuda" backend's conv: CUTLASS 3.x's persistent ping-pong GEMM with the
// same fused epilogue as the conv kernels (conv_cutlass_sm90.cuh).
//
// Its own header, included only by conv_cutlass_sm90_<type>_gemm_n<width>.cu: CUTLASS's GEMM kernel
// specializations and its conv kernel's both match GemmUniversal<...> for the conv's problem
// shape, so one file cannot hold both.
#pragma once

#include "conv_cutlass_sm90_epilogue.cuh"  // first: it defines NDEBUG before CUTLASS's headers

#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <cstdint>
#include <limits>

namespace cnnkernels::cutlass_sm90 {

// A 1x1 stride-1 conv over channels_last tensors is the GEMM D[M, K] = A[M, C] B[C, K] with
// M = N*H*W: it runs CUTLASS's persistent ping-pong GEMM, whose two consumer warpgroups overlap
// one tile's epilogue with the next tile's mainloop. The conv kernel (conv_cutlass_sm90.cuh) is
// not persistent, and its single consumer warpgroup leaves each SM idle while it stores: on the
// first H200 run the short-reduction 1x1 layers ran at 0.43-0.53x cuDNN's fused conv, and as this
// GEMM 0.80-1.16x on the second. Tiles are 128 x TileN: 64 wide for at most 64 output channels,
// where a 128-wide one would spend half its MMAs on nothing.
template <Element E, int TileN>
struct GemmKernelConfig {
  using T = typename ElementType<E>::type;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<T>::value;
  using TileShape = cute::Shape<cute::_128, cute::Int<TileN>, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using FusionOp = FusedEpilogue<E>;
  using RowMajor = cutlass::layout::RowMajor;        // activations, residual, output: (M, channels)
  using ColumnMajor = cutlass::layout::ColumnMajor;  // the weight (K, C) read as B = (C x K), C fastest

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, /*ElementAccumulator=*/float,
      /*ElementCompute=*/float, T, RowMajor, kAlignment, T, RowMajor, kAlignment,
      cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, RowMajor, kAlignment, T, ColumnMajor,
      kAlignment, /*ElementAccumulator=*/float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <Element E, int TileN>
static typename GemmKernelConfig<E, TileN>::Gemm::Arguments make_gemm_arguments(const ConvProblem& p) {
  using Config = GemmKernelConfig<E, TileN>;
  using T = typename Config::T;
  using Kernel = typename Config::Kernel;
  const int M = p.N * p.H * p.W;
  const auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(M, p.C, 1));
  const auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(p.K, p.C, 1));
  const auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, cute::make_shape(M, p.K, 1));
  const auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(M, p.K, 1));
  cutlass::KernelHardwareInfo hw_info;
  (void)cudaGetDevice(&hw_info.device_id);  // the caller's device guard made it the tensors' device
  hw_info.sm_count = p.sm_count;
  typename Config::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, p.K, p.C, 1},
      {static_cast<const T*>(p.input), stride_a, static_cast<const T*>(p.weight), stride_b},
      {{}, epilogue_source<E>(p), stride_c, static_cast<T*>(p.output), stride_d},
      hw_info};
  set_fused_epilogue<E>(args.epilogue.thread, p);
  return args;
}

template <Element E, int TileN>
bool Sm90GemmBiasResidualRelu<E, TileN>::can_implement(const ConvProblem& p) {
  constexpr int kAlign = GemmKernelConfig<E, TileN>::kAlignment;
  if (p.R != 1 || p.S != 1 || p.stride_h != 1 || p.stride_w != 1 || p.pad_h != 0 || p.pad_w != 0) return false;
  if (p.C % kAlign != 0 || p.K % kAlign != 0) return false;
  if (int64_t{p.N} * p.H * p.W > std::numeric_limits<int>::max()) return false;  // M = N*H*W is an int
  if (!operands_aligned(p)) return false;
  return GemmKernelConfig<E, TileN>::Gemm::can_implement(make_gemm_arguments<E, TileN>(p)) == cutlass::Status::kSuccess;
}

template <Element E, int TileN>
size_t Sm90GemmBiasResidualRelu<E, TileN>::workspace_size(const ConvProblem& p) {
  return GemmKernelConfig<E, TileN>::Gemm::get_workspace_size(make_gemm_arguments<E, TileN>(p));
}

template <Element E, int TileN>
const char* Sm90GemmBiasResidualRelu<E, TileN>::run(const ConvProblem& p, void* workspace, cudaStream_t stream) {
  return initialize_and_run<typename GemmKernelConfig<E, TileN>::Gemm>(
      make_gemm_arguments<E, TileN>(p), workspace, stream,
      "CUTLASS GEMM initialize() failed (TMA descriptor or shared-memory attribute)", "CUTLASS GEMM launch failed");
}

}  // namespace cnnkernels::cutlass_sm90
