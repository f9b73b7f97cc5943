// What the CUTLASS kernels of this folder share (conv_cutlass_sm90.cuh, conv_cutlass_sm90_gemm.cuh):
// NDEBUG before CUTLASS's headers, the element types, the fused epilogue, and the launch.
#pragma once

// Before any include (so every CUTLASS header this extension compiles comes after it): CUTLASS's
// device-side asserts are calls, and a call between wgmma instructions makes ptxas serialize
// them (warning C7510), a large loss. conv.cu checks every precondition the host-side asserts
// would (can_implement) before it runs the kernel.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "conv_cutlass_sm90.h"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/kernel_hardware_info.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/thread/activation.h>

namespace cnnkernels::cutlass_sm90 {

template <Element E>
struct ElementType;
template <>
struct ElementType<Element::kBF16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct ElementType<Element::kFP16> {
  using type = cutlass::half_t;
};

// The fused epilogue of every kernel here: D = ReLU(alpha * acc + bias[k] + beta * C).
// cutlass::epilogue::thread::ReLu propagates NaN (maximum<T, PropagateNaN=true>), as torch.relu.
template <Element E>
using FusedEpilogue = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<
    cutlass::epilogue::thread::ReLu, /*ElementOutput=*/typename ElementType<E>::type, /*ElementCompute=*/float,
    /*ElementBias=*/typename ElementType<E>::type, /*ElementSource=*/typename ElementType<E>::type,
    /*ElementScalar=*/float>;

// Every pointer of the problem 16-byte aligned (TMA's requirement; nullptr counts as aligned).
inline bool operands_aligned(const ConvProblem& p) {
  for (const void* ptr : {p.input, p.weight, p.bias, p.residual, static_cast<const void*>(p.output)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  return true;
}

// The source C the epilogue reads: the residual, or without one the output, a valid address that
// is never read (beta == 0).
template <Element E>
const typename ElementType<E>::type* epilogue_source(const ConvProblem& p) {
  return static_cast<const typename ElementType<E>::type*>(p.residual != nullptr ? p.residual : p.output);
}

// FusedEpilogue's arguments: alpha 1, beta 1 with a residual (else 0), the bias (nullptr reads as zeros).
template <Element E, typename FusionArguments>
void set_fused_epilogue(FusionArguments& fusion, const ConvProblem& p) {
  fusion.alpha = 1.0f;
  fusion.beta = p.residual != nullptr ? 1.0f : 0.0f;
  fusion.bias_ptr = static_cast<const typename ElementType<E>::type*>(p.bias);
}

// Initializes a CUTLASS device-level operator (its GEMM or conv adapter) with `args` and launches it
// on `stream`: nullptr on success, else the message for the step that failed.
template <typename Operator>
const char* initialize_and_run(const typename Operator::Arguments& args, void* workspace, cudaStream_t stream,
                               const char* initialize_failed, const char* launch_failed) {
  Operator op;
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return initialize_failed;
  if (op.run(stream) != cutlass::Status::kSuccess) return launch_failed;
  return nullptr;
}

}  // namespace cnnkernels::cutlass_sm90
