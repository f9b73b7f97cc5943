// CUTLASS Hopper conv fprop + bias + residual + ReLU, fp16 with a 128-wide output-channel tile
// (conv_cutlass_sm90.cuh); one instantiation per file so that the slow compiles run in parallel.
#ifdef CNNKERNELS_WITH_CUTLASS
#include "conv_cutlass_sm90.cuh"  // first: it defines NDEBUG before CUTLASS's headers

template struct cnnkernels::cutlass_sm90::Sm90ConvBiasResidualRelu<cnnkernels::cutlass_sm90::Element::kFP16, 128>;
#endif
