// What the CUTLASS kernels of this folder share (conv_cutlass_sm90.cuh, conv_cutlass_sm90_gemm.cuh):
// NDEBUG before CUTLASS's headers, the element types, and the fused epilogue.
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

}  // namespace cnnkernels::cutlass_sm90
