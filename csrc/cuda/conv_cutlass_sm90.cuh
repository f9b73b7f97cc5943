// The fast path of the "cuda" backend's conv: CUTLASS 3.x Hopper implicit-GEMM conv fprop.
//
// Why CUTLASS rather than our own wgmma kernel: on Hopper the speed of an implicit-GEMM conv
// comes from TMA im2col loads (the copy engine gathers the shifted NHWC windows, padding
// included, straight into swizzled shared memory), a warp-specialized producer/consumer
// pipeline, and wgmma with fp32 accumulators; CUTLASS's CollectiveBuilder gives all three,
// tested upstream, plus an epilogue visitor tree that fuses exactly our epilogue:
//   D = ReLU(alpha * acc + bias[k] + beta * C),  C = the residual (beta = 1) or unread (beta = 0).
// A hand-written wgmma kernel would have to rebuild that machinery before it could match it.
// Issue 4 asks to choose by measurement: the session that wrote this had no GPU, so the choice
// rests on CUTLASS's published Hopper numbers and on the compile evidence (SASS shows HGMMA,
// UTMALDG.IM2COL, no local memory; see resource_usage.txt). The first GPU run must confirm it
// with benchmarks against cuDNN (the issue's targets: >= 1.15x eager, >= 1.0x cuDNN fused).
//
// Build budget: CI compiles this on 2 cores every run, so there are two tile shapes, 128x128x64
// and 128x64x64 (one consumer warpgroup, cluster 1x1x1), each instantiated per element type in
// its own file; the residual is a runtime choice (beta), not another instantiation. The 64-wide
// tile is for convs with at most 64 output channels: on the first H200 run those ran at 20-26%
// of the roofline with the 128-wide tile, half of whose MMAs then multiply zeros. CUTLASS 4.2's conv
// kernels support only the non-persistent KernelImplicitTmaWarpSpecializedSm90 schedule, so 1x1
// stride-1 convs with wider outputs run a persistent GEMM instead (conv_cutlass_sm90_gemm.cuh).
//
// The device code exists only when compiled for sm_90a (wgmma is arch-conditional); for other
// targets CUTLASS compiles a stub, and conv.cu's probe kernel keeps us from ever launching it.
#pragma once

#include "conv_cutlass_sm90_epilogue.cuh"  // first: it defines NDEBUG before CUTLASS's headers

#include <cutlass/conv/convolution.h>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>

namespace cnnkernels::cutlass_sm90 {

template <Element E, int TileN>
struct ConvKernelConfig {
  using T = typename ElementType<E>::type;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<T>::value;  // 16-byte TMA rows
  using Layout = cutlass::layout::TensorNHWC;
  using TileShape = cute::Shape<cute::_128, cute::Int<TileN>, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr auto kConvOp = cutlass::conv::Operator::kFprop;

  using FusionOp = FusedEpilogue<E>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, /*ElementAccumulator=*/float,
      /*ElementCompute=*/float, T, Layout, kAlignment, T, Layout, kAlignment,
      cutlass::epilogue::TmaWarpSpecialized, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kConvOp, T, Layout, kAlignment, T, Layout,
      kAlignment, /*ElementAccumulator=*/float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape =
      cutlass::conv::ConvProblemShape<kConvOp, CollectiveMainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
};

template <Element E, int TileN>
static typename ConvKernelConfig<E, TileN>::Conv::Arguments make_arguments(const ConvProblem& p) {
  using Config = ConvKernelConfig<E, TileN>;
  using T = typename Config::T;
  typename Config::ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation,
                                      {p.N, p.H, p.W, p.C},  // activation, NHWC
                                      {p.K, p.R, p.S, p.C},  // filter, KRSC
                                      {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w},
                                      {p.stride_h, p.stride_w}, {p.dil_h, p.dil_w}, /*groups=*/1);
  // The output (and residual) is (N, P, Q, K) packed: the M mode of the GEMM is (Q, P, N).
  typename Config::StrideC stride_c{};
  typename Config::StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Config::StrideC{})>{}, [&](auto i) {
    cute::get<0, i>(stride_c) = shape.stride_C[Config::ProblemShape::RankT - 2 - i];
  });
  cute::for_each(cute::make_seq<cute::rank<0>(typename Config::StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = shape.stride_C[Config::ProblemShape::RankT - 2 - i];
  });

  typename Config::Conv::Arguments args{
      shape,
      {static_cast<const T*>(p.input), static_cast<const T*>(p.weight)},
      {{}, epilogue_source<E>(p), stride_c, static_cast<T*>(p.output), stride_d}};
  set_fused_epilogue<E>(args.epilogue.thread, p);
  return args;
}

template <Element E, int TileN>
bool Sm90ConvBiasResidualRelu<E, TileN>::can_implement(const ConvProblem& p) {
  using Config = ConvKernelConfig<E, TileN>;
  constexpr int kAlign = Config::kAlignment;
  // TMA im2col: traversal strides are at most 8 (cuTensorMapEncodeIm2col's elementStrides).
  // CUTLASS's own can_implement checks channel alignment, padding, corners and filter offsets.
  if (p.C % kAlign != 0 || p.K % kAlign != 0) return false;
  if (p.stride_h > 8 || p.stride_w > 8) return false;
  if (!operands_aligned(p)) return false;
  auto args = make_arguments<E, TileN>(p);
  // The problem shape derives P and Q itself; they must be the ones the caller allocated.
  if (args.problem_shape.shape_C[1] != p.P || args.problem_shape.shape_C[2] != p.Q) return false;
  return Config::Conv::can_implement(args) == cutlass::Status::kSuccess;
}

template <Element E, int TileN>
size_t Sm90ConvBiasResidualRelu<E, TileN>::workspace_size(const ConvProblem& p) {
  return ConvKernelConfig<E, TileN>::Conv::get_workspace_size(make_arguments<E, TileN>(p));
}

template <Element E, int TileN>
const char* Sm90ConvBiasResidualRelu<E, TileN>::run(const ConvProblem& p, void* workspace, cudaStream_t stream) {
  return initialize_and_run<typename ConvKernelConfig<E, TileN>::Conv>(
      make_arguments<E, TileN>(p), workspace, stream,
      "CUTLASS conv initialize() failed (TMA descriptor or shared-memory attribute)", "CUTLASS conv launch failed");
}

}  // namespace cnnkernels::cutlass_sm90
