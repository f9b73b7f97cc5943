// Interface to the CUTLASS 3.x Hopper implicit-GEMM conv fprop kernels (conv_cutlass_sm90.cuh).
// Plain types only, so that the files which include torch's headers never include CUTLASS's
// and the other way round: each side compiles faster and their half types never meet.
#pragma once

#include <cstddef>
#include <cuda_runtime_api.h>

namespace cnnkernels::cutlass_sm90 {

enum class Element { kBF16, kFP16 };

// One conv in CUTLASS's terms. Every tensor is dense in NHWC order (channels_last), 16-byte aligned:
// input N×H×W×C, weight K×R×S×C, output and residual N×P×Q×K, bias K.
struct ConvProblem {
  const void* input = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;      // nullptr: no bias
  const void* residual = nullptr;  // nullptr: no residual (beta = 0, C is never read)
  void* output = nullptr;
  int N = 0, H = 0, W = 0, C = 0, K = 0, R = 0, S = 0, P = 0, Q = 0;
  int pad_h = 0, pad_w = 0, stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1;
  int sm_count = 0;  // for the persistent GEMM's grid; 0: CUTLASS asks the device
};

// Output-channel tile widths (conv and GEMM): 64 for at most 64 output channels, else 128.
constexpr int kNarrowTileN = 64, kWideTileN = 128;

// Defined once per element type and tile width in conv_cutlass_sm90_<type>_n<width>.cu.
template <Element E, int TileN>
struct Sm90ConvBiasResidualRelu {
  static constexpr int kTileN = TileN;
  // Host-only: whether this kernel accepts the problem (alignment, TMA im2col limits).
  static bool can_implement(const ConvProblem& p);
  static size_t workspace_size(const ConvProblem& p);
  // Launches on `stream`. Returns nullptr on success, else a message saying what failed.
  static const char* run(const ConvProblem& p, void* workspace, cudaStream_t stream);
};

// A 1x1, stride-1, unpadded conv as a persistent GEMM (same interface; R = S = 1 in the problem).
// Defined once per element type and tile width in conv_cutlass_sm90_<type>_gemm_n<width>.cu.
template <Element E, int TileN>
struct Sm90GemmBiasResidualRelu {
  static constexpr int kTileN = TileN;
  static bool can_implement(const ConvProblem& p);
  static size_t workspace_size(const ConvProblem& p);
  static const char* run(const ConvProblem& p, void* workspace, cudaStream_t stream);
};

extern template struct Sm90GemmBiasResidualRelu<Element::kBF16, kWideTileN>;
extern template struct Sm90GemmBiasResidualRelu<Element::kBF16, kNarrowTileN>;
extern template struct Sm90GemmBiasResidualRelu<Element::kFP16, kWideTileN>;
extern template struct Sm90GemmBiasResidualRelu<Element::kFP16, kNarrowTileN>;
extern template struct Sm90ConvBiasResidualRelu<Element::kBF16, kWideTileN>;
extern template struct Sm90ConvBiasResidualRelu<Element::kBF16, kNarrowTileN>;
extern template struct Sm90ConvBiasResidualRelu<Element::kFP16, kWideTileN>;
extern template struct Sm90ConvBiasResidualRelu<Element::kFP16, kNarrowTileN>;

}  // namespace cnnkernels::cutlass_sm90
