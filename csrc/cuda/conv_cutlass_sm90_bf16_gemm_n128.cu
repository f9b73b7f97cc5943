// CUTLASS Hopper persistent GEMM + bias + residual + ReLU for 1x1 convs, bf16 with a 128-wide
// output-channel tile (conv_cutlass_sm90_gemm.cuh); one instantiation per file so that the slow
// compiles run in parallel.
#ifdef CNNKERNELS_WITH_CUTLASS
#include "conv_cutlass_sm90_gemm.cuh"

template struct cnnkernels::cutlass_sm90::Sm90GemmBiasResidualRelu<cnnkernels::cutlass_sm90::Element::kBF16, 128>;
#endif
