// CUTLASS Hopper conv fprop + bias + residual + ReLU, fp16 with a 128-wide output-channel tile;
// see conv_cutlass_sm90.cuh. One instantiation per file so that the slow CUTLASS compiles run in
// parallel.
#ifdef CNNKERNELS_WITH_CUTLASS
// Before any include: CUTLASS's device-side asserts are calls, and a call between wgmma
// instructions makes ptxas serialize them (warning C7510), a large loss. conv.cu checks every
// precondition the host-side asserts would (can_implement) before it runs the kernel.
#ifndef NDEBUG
#define NDEBUG
#endif
#include "conv_cutlass_sm90.cuh"

namespace cnnkernels::cutlass_sm90 {
template struct Sm90ConvBiasResidualRelu<Element::kFP16, kWideTileN>;
}  // namespace cnnkernels::cutlass_sm90
#endif
