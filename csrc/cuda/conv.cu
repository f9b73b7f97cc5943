// conv2d + bias (+ residual) + ReLU on CUDA: the ops' CUDA entry points and the choice of kernel.
//
// bf16/fp16 convs go to the CUTLASS Hopper kernels (conv_cutlass_sm90.cuh) when the device is
// sm_90, the build holds sm_90a code, and the conv fits them: groups == 1, out channels a
// multiple of 8, stride <= 8 and CUTLASS's TMA im2col limits. They need channels_last-dense,
// 16-byte-aligned tensors with in channels a multiple of 8, so other inputs are copied once into
// that form (zero channels appended, e.g. 12 -> 16; an NCHW output copied back): far cheaper than
// running such a conv on CUDA cores. A stem (fewer than 16 in channels, e.g. RGB) runs instead as
// a 1x1 conv over its packed windows (pack_windows.cuh; a few images per pass, so that the
// windows take at most 64 MiB), and a 1x1 unpadded conv as CUTLASS's persistent GEMM (a strided
// one, ResNet's downsampling convs, over a copy of every stride-th pixel). Both kernels take
// 64-wide output-channel tiles for at most 64 output channels, else 128-wide ones. Everything
// else, fp32 (IEEE, no TF32) and fp64 included, runs the generic kernels of conv_generic.cuh.
//
// CNNKERNELS_CUDA_CONV (read on every call) picks the kernel for tests and benchmarks:
// "auto" (default), "generic", "cutlass" (raises NotImplementedError saying why when the CUTLASS
// kernel cannot take the conv, instead of falling back), or "cutlass-conv": as "cutlass", but
// 1x1 convs run CUTLASS's conv kernel, never the persistent GEMM (strided ones not subsampled),
// so that benchmarks/cuda_gemm_routes.py can time the GEMM routes against it in one GPU run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "../conv_args.h"
#include "common.cuh"
#include "conv_cutlass_sm90.h"
#include "conv_generic.cuh"
#include "cuda_kernels.h"
#include "pack_windows.cuh"

namespace cnnkernels {

std::vector<std::string> cuda_kernel_names() {
  std::vector<std::string> names = {"add_relu", "relu_backward_bias_grad", "conv_implicit_gemm", "conv_direct"};
#ifdef CNNKERNELS_WITH_CUTLASS
  names.push_back("conv_cutlass_sm90_bf16");  // conv tiles 128x128 and 128x64; 1x1 as a GEMM
  names.push_back("conv_cutlass_sm90_fp16");
#endif
  return names;
}

namespace cuda {
namespace {

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// `bias` is contiguous or undefined, `residual` any strides or undefined, `out` already allocated.
void launch_conv_generic(const char* op, const ConvShape& s, const at::Tensor& input,
                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& residual,
                         const at::Tensor& out, cudaStream_t stream) {
  GenericConvParams p{};
  p.M = s.N * s.OH * s.OW;
  p.N = static_cast<int>(s.N); p.C = static_cast<int>(s.C); p.H = static_cast<int>(s.H);
  p.W = static_cast<int>(s.W); p.K = static_cast<int>(s.K); p.R = static_cast<int>(s.R);
  p.S = static_cast<int>(s.S); p.OH = static_cast<int>(s.OH); p.OW = static_cast<int>(s.OW);
  p.stride_h = static_cast<int>(s.stride_h); p.stride_w = static_cast<int>(s.stride_w);
  p.pad_h = static_cast<int>(s.pad_h); p.pad_w = static_cast<int>(s.pad_w);
  p.dil_h = static_cast<int>(s.dil_h); p.dil_w = static_cast<int>(s.dil_w);
  p.groups = static_cast<int>(s.groups);
  p.Cg = static_cast<int>(s.C / s.groups);
  p.Kg = static_cast<int>(s.K / s.groups);
  p.Kred = static_cast<int>(p.Cg * s.R * s.S);
  p.in = strides_of(input);
  p.wt = strides_of(weight);
  p.res = residual.defined() ? strides_of(residual) : Strides4{0, 0, 0, 0};
  p.out = strides_of(out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in_ptr = input.const_data_ptr<scalar_t>();
    const scalar_t* wt_ptr = weight.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* res_ptr = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    if (p.Cg == 1) {
      const int64_t total = p.M * p.K;
      const auto blocks =
          static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, int64_t{multiprocessor_count()} * 8));
      if (out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous()) {
        conv_direct_kernel<scalar_t, acc_t, true>
            <<<blocks, 256, 0, stream>>>(p, in_ptr, wt_ptr, bias_ptr, res_ptr, out_ptr);
      } else {
        conv_direct_kernel<scalar_t, acc_t, false>
            <<<blocks, 256, 0, stream>>>(p, in_ptr, wt_ptr, bias_ptr, res_ptr, out_ptr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t m_tiles = (p.M + igemm::BM - 1) / igemm::BM;
      const int64_t gn_tiles = static_cast<int64_t>(p.groups) * ((p.Kg + igemm::BN - 1) / igemm::BN);
      TORCH_CHECK(m_tiles <= std::numeric_limits<int32_t>::max(), op, ": output too large");
      const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(std::min<int64_t>(gn_tiles, 65535)));
      conv_igemm_kernel<scalar_t, acc_t>
          <<<grid, igemm::kThreads, 0, stream>>>(p, in_ptr, wt_ptr, bias_ptr, res_ptr, out_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

enum class ConvKernelChoice { kAuto, kGeneric, kCutlass, kCutlassConvKernel };

ConvKernelChoice requested_kernel() {
  const char* v = std::getenv("CNNKERNELS_CUDA_CONV");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return ConvKernelChoice::kAuto;
  if (std::strcmp(v, "generic") == 0) return ConvKernelChoice::kGeneric;
  if (std::strcmp(v, "cutlass") == 0) return ConvKernelChoice::kCutlass;
  if (std::strcmp(v, "cutlass-conv") == 0) return ConvKernelChoice::kCutlassConvKernel;
  TORCH_CHECK(false, "CNNKERNELS_CUDA_CONV must be 'auto', 'generic', 'cutlass' or 'cutlass-conv', but got '", v, "'");
}

#ifdef CNNKERNELS_WITH_CUTLASS
constexpr int kProbeSharedBytes = 4096;

// Its static shared memory is kProbeSharedBytes in code compiled for sm_90a and none in code for
// any other target (attributes may add the 1 KiB that sm_90 reserves per block, hence ">="). The runtime picks code for a device the same way for every kernel of the
// extension, so reading the probe's attributes tells, without a launch or a sync, whether the
// CUTLASS kernels on this device are the real wgmma kernels or CUTLASS's stubs.
__global__ void sm90a_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ int marker[kProbeSharedBytes / sizeof(int)];
  marker[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (out != nullptr) out[threadIdx.x] = marker[threadIdx.x ^ 1u];
#endif
}

bool sm90a_code_runs_on(int device) {
  static std::mutex mutex;
  static std::vector<int> cache;  // per device: -1 unknown, 0 no, 1 yes
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<int>(cache.size()) <= device) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
    bool ok = prop->major == 9 && prop->minor == 0;
    if (ok) {
      cudaFuncAttributes attr{};
      ok = cudaFuncGetAttributes(&attr, sm90a_probe_kernel) == cudaSuccess &&
           attr.sharedSizeBytes >= kProbeSharedBytes;
      (void)cudaGetLastError();  // a device without a matching image leaves an error behind
    }
    cache[device] = ok ? 1 : 0;
  }
  return cache[device] == 1;
}

using cutlass_sm90::ConvProblem;
using cutlass_sm90::Element;
using cutlass_sm90::Sm90ConvBiasResidualRelu;

// Whether the CUTLASS problem can run as the persistent GEMM (conv_cutlass_sm90_gemm.cuh): 1x1,
// stride 1, unpadded (packed stems and subsampled strided 1x1 convs included).
bool runs_as_gemm(const ConvProblem& p) {
  return p.R == 1 && p.S == 1 && p.stride_h == 1 && p.stride_w == 1 && p.pad_h == 0 && p.pad_w == 0;
}

constexpr int64_t kChannelAlign = 8;  // 16 bytes of bf16/fp16: TMA's row alignment

int64_t padded_channels(int64_t c) { return (c + kChannelAlign - 1) / kChannelAlign * kChannelAlign; }

// A stem (fewer than 16 input channels, a kernel larger than 1x1) runs as a 1x1 conv over its
// packed windows (pack_windows.cuh): C * R * S reduction columns rounded up to 8, instead of a
// 64-wide channel tile per tap for C padded to 8 (an RGB 7x7 stem: 152 columns against 49 x 64).
bool packs_windows(const ConvShape& s) {
  return s.C < 16 && s.R * s.S > 1 && s.OH * s.OW <= std::numeric_limits<int32_t>::max();
}

// A stem's packed windows are many times its input (ResNet-50's at batch 256 in bf16: 976 MB,
// 12.7x), so they are packed and run a few images at a time, in passes that reuse one buffer of at
// most this many bytes (at least one image). 64 MiB is a guess, not a measurement: it bounds the
// memory while keeping the passes few (4 for ResNet-50's stem at batch 64, so that their launches
// stay cheaper than their GPU time); a pass small enough to stay in L2 might save HBM traffic.
// CNNKERNELS_CUDA_STEM_PASS_BYTES (read on every call) overrides it, for tests and for the sweep
// of benchmarks/cuda_gemm_routes.py, which should set it.
constexpr int64_t kStemPassBytes = int64_t{64} << 20;

int64_t stem_pass_bytes() {
  const char* v = std::getenv("CNNKERNELS_CUDA_STEM_PASS_BYTES");
  if (v == nullptr || *v == '\0') return kStemPassBytes;
  char* end = nullptr;
  const long long bytes = std::strtoll(v, &end, 10);
  TORCH_CHECK(*end == '\0' && bytes > 0,
              "CNNKERNELS_CUDA_STEM_PASS_BYTES must be a positive number of bytes, but got '", v, "'");
  return bytes;
}

// A strided 1x1 conv without padding is the stride-1 1x1 conv over every stride-th pixel: copied
// out once (a quarter of the input at stride 2), it runs as the persistent GEMM. On the H200 the
// conv kernel ran ResNet-50's strided downsampling convs at 0.57-0.83x cuDNN's fused conv, while
// its stride-1 1x1 layers of the same FLOPs ran 0.92-1.16x as the GEMM
// (benchmarks/results/2026-11-28_NVIDIA-H200_torch2.11.0-cu130_triton3.6.0-run2-resnet50.txt).
bool subsamples(const ConvShape& s) {
  return s.R == 1 && s.S == 1 && s.pad_h == 0 && s.pad_w == 0 && (s.stride_h > 1 || s.stride_w > 1);
}

// Every stride-th pixel of the input of a conv that subsamples(): a (N, C, OH, OW) view.
at::Tensor subsampled(const ConvShape& s, const at::Tensor& input) {
  return input.slice(2, 0, (s.OH - 1) * s.stride_h + 1, s.stride_h).slice(3, 0, (s.OW - 1) * s.stride_w + 1, s.stride_w);
}

// How the CUTLASS kernels run a conv (plan_cutlass).
struct CutlassPlan {
  // Input channels padded with zeros to a multiple of 8; a stem or a subsampled conv as the
  // 1x1, stride-1 conv that runs.
  ConvProblem problem;
  bool packs_windows = false;  // a stem: the 1x1 conv over its packed windows
  bool subsamples = false;     // a strided 1x1 conv: the stride-1 one over every stride-th pixel
  bool as_gemm = false;        // the persistent GEMM, else the conv kernel
  // Images per launch: all of them, except for a stem's passes (stem_pass_bytes). `problem` is
  // one pass's; the last pass may hold fewer images.
  int64_t images_per_pass = 0;
};

// `gemm_routes` false (CNNKERNELS_CUDA_CONV=cutlass-conv) keeps every conv on the conv kernel.
CutlassPlan plan_cutlass(const ConvShape& s, bool gemm_routes) {
  CutlassPlan plan;
  plan.packs_windows = packs_windows(s);
  plan.subsamples = gemm_routes && subsamples(s);
  ConvProblem& p = plan.problem;
  plan.images_per_pass = s.N;
  p.K = static_cast<int>(s.K);
  if (plan.packs_windows || plan.subsamples) {  // R = S = 1, no padding, stride and dilation 1: the struct's defaults
    p.H = p.P = static_cast<int>(s.OH); p.W = p.Q = static_cast<int>(s.OW);
    p.C = static_cast<int>(padded_channels(plan.packs_windows ? s.C * s.R * s.S : s.C));
    p.R = p.S = 1;
    if (plan.packs_windows) {
      const int64_t image_bytes = s.OH * s.OW * p.C * 2;  // bf16 or fp16
      const int64_t fit = std::max<int64_t>(1, stem_pass_bytes() / image_bytes);
      plan.images_per_pass = std::min({s.N, fit, std::numeric_limits<int32_t>::max() / (s.OH * s.OW)});
    }
  } else {
    p.H = static_cast<int>(s.H); p.W = static_cast<int>(s.W);
    p.C = static_cast<int>(padded_channels(s.C));
    p.R = static_cast<int>(s.R); p.S = static_cast<int>(s.S);
    p.P = static_cast<int>(s.OH); p.Q = static_cast<int>(s.OW);
    p.pad_h = static_cast<int>(s.pad_h); p.pad_w = static_cast<int>(s.pad_w);
    p.stride_h = static_cast<int>(s.stride_h); p.stride_w = static_cast<int>(s.stride_w);
    p.dil_h = static_cast<int>(s.dil_h); p.dil_w = static_cast<int>(s.dil_w);
  }
  p.N = static_cast<int>(plan.images_per_pass);
  plan.as_gemm = gemm_routes && runs_as_gemm(p);
  return plan;
}

// Calls f with the plan's CUTLASS kernel for this dtype (as a value of its type): the persistent
// GEMM or the conv kernel, each with a 64-wide tile for at most 64 output channels, else a
// 128-wide one.
template <typename F>
auto with_cutlass_kernel(at::ScalarType dtype, const CutlassPlan& plan, F&& f) {
  using cutlass_sm90::kNarrowTileN;
  using cutlass_sm90::kWideTileN;
  using cutlass_sm90::Sm90GemmBiasResidualRelu;
  const bool bf16 = dtype == at::kBFloat16, narrow = plan.problem.K <= kNarrowTileN;
  if (plan.as_gemm && narrow) {
    return bf16 ? f(Sm90GemmBiasResidualRelu<Element::kBF16, kNarrowTileN>{})
                : f(Sm90GemmBiasResidualRelu<Element::kFP16, kNarrowTileN>{});
  }
  if (plan.as_gemm) {
    return bf16 ? f(Sm90GemmBiasResidualRelu<Element::kBF16, kWideTileN>{})
                : f(Sm90GemmBiasResidualRelu<Element::kFP16, kWideTileN>{});
  }
  if (narrow) {
    return bf16 ? f(Sm90ConvBiasResidualRelu<Element::kBF16, kNarrowTileN>{})
                : f(Sm90ConvBiasResidualRelu<Element::kFP16, kNarrowTileN>{});
  }
  return bf16 ? f(Sm90ConvBiasResidualRelu<Element::kBF16, kWideTileN>{})
              : f(Sm90ConvBiasResidualRelu<Element::kFP16, kWideTileN>{});
}

// Why the CUTLASS kernel cannot take this conv; empty when it can. `sm90a_device`: whether the
// tensors' device runs this build's sm_90a code (sm90a_code_runs_on).
std::string cutlass_unsupported(const ConvShape& s, const CutlassPlan& plan, at::ScalarType dtype, bool sm90a_device) {
  std::vector<std::string> why;
  if (!sm90a_device) {
    why.push_back("a compute capability 9.0 GPU and a build with sm_90a code (TORCH_CUDA_ARCH_LIST=9.0a)");
  }
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    why.push_back("dtype bfloat16 or float16 (got " + std::string(c10::toString(dtype)) + ")");
  }
  if (s.groups != 1) why.push_back("groups == 1 (got " + std::to_string(s.groups) + ")");
  if (s.K % kChannelAlign != 0) {
    why.push_back("out channels that are a multiple of 8 (got " + std::to_string(s.K) + ")");
  }
  if (why.empty() && !with_cutlass_kernel(dtype, plan, [&](auto kernel) {
        return decltype(kernel)::can_implement(plan.problem);
      })) {
    why.push_back("a geometry within its TMA im2col limits (stride <= 8, padding <= 256, "
                  "(kernel - 1) * dilation < 255, N*OH*OW < 2^31)");
  }
  std::string text;
  for (const auto& w : why) text += (text.empty() ? "needs " : "; needs ") + w;
  return text;
}

// `t` (input or weight) channels_last-dense, 16-byte aligned and with `channels` channels (the
// extra ones zero), copying only when `t` is not already so.
at::Tensor as_tma_operand(const at::Tensor& t, int64_t channels) {
  const auto CL = at::MemoryFormat::ChannelsLast;
  if (t.size(1) != channels) {
    // Not at::zeros: factory functions without a memory_format argument drop the options' one,
    // which made this NCHW (wrong results for every padded stem on the first H200 run).
    at::Tensor padded = at::empty({t.size(0), channels, t.size(2), t.size(3)}, t.options().memory_format(CL)).zero_();
    padded.narrow(1, 0, t.size(1)).copy_(t);
    return padded;
  }
  at::Tensor c = t.contiguous(CL);
  if (!is_aligned(c.const_data_ptr(), 16)) c = c.clone(CL);
  return c;
}

// Writes the stem's windows of `images` (some of the input's images) into `cols`, a channels_last
// (images, kpad, OH, OW) tensor (pack_windows.cuh).
void pack_windows(const ConvShape& s, const at::Tensor& images, const at::Tensor& cols, cudaStream_t stream) {
  const int64_t kpad = cols.size(1);
  PackWindowsParams p{};
  p.M = static_cast<int>(images.size(0) * s.OH * s.OW);  // below 2^31 (plan_cutlass)
  p.C = static_cast<int>(s.C); p.H = static_cast<int>(s.H); p.W = static_cast<int>(s.W);
  p.R = static_cast<int>(s.R); p.S = static_cast<int>(s.S);
  p.OH = static_cast<int>(s.OH); p.OW = static_cast<int>(s.OW);
  p.stride_h = static_cast<int>(s.stride_h); p.stride_w = static_cast<int>(s.stride_w);
  p.pad_h = static_cast<int>(s.pad_h); p.pad_w = static_cast<int>(s.pad_w);
  p.dil_h = static_cast<int>(s.dil_h); p.dil_w = static_cast<int>(s.dil_w);
  p.Kred = static_cast<int>(s.C * s.R * s.S);
  p.Kpad = static_cast<int>(kpad);
  p.in = strides_of(images);
  // Threads across a row's columns (a multiple of 32); enough blocks to fill every SM's 2048 threads.
  const int threads = static_cast<int>(std::min<int64_t>((kpad + 31) / 32 * 32, kPackMaxThreads));
  const auto blocks = static_cast<unsigned>(
      std::min<int64_t>(p.M, int64_t{multiprocessor_count()} * (2048 / threads)));
  AT_DISPATCH_REDUCED_FLOATING_TYPES(images.scalar_type(), "pack_windows", [&] {
    pack_windows_kernel<scalar_t><<<blocks, threads, 0, stream>>>(p, images.const_data_ptr<scalar_t>(),
                                                                  cols.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The weight of the packed 1x1 conv: (K, C, R, S) as rows (r, s, c), zero-padded to kpad.
at::Tensor packed_weight(const at::Tensor& weight, int64_t kpad) {
  const int64_t K = weight.size(0), taps = weight.size(1) * weight.size(2) * weight.size(3);
  at::Tensor rows = at::zeros({K, kpad}, weight.options());  // a fresh, 16-byte aligned allocation
  rows.narrow(1, 0, taps).copy_(weight.permute({0, 2, 3, 1}).reshape({K, taps}));
  return rows;
}

void run_cutlass(const char* op, const ConvShape& s, const CutlassPlan& plan, const at::Tensor& input,
                 const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& residual,
                 const at::Tensor& out, cudaStream_t stream) {
  const auto CL = at::MemoryFormat::ChannelsLast;
  ConvProblem p = plan.problem;
  const bool packed = plan.packs_windows;
  // A stem's windows: one buffer of a pass's images, refilled by every pass.
  const at::Tensor x = packed ? at::empty({plan.images_per_pass, p.C, s.OH, s.OW}, input.options().memory_format(CL))
                               : as_tma_operand(plan.subsamples ? subsampled(s, input) : input, p.C);
  const at::Tensor w = packed ? packed_weight(weight, p.C) : as_tma_operand(weight, p.C);
  const at::Tensor res = residual.defined() ? as_tma_operand(residual, s.K) : at::Tensor();
  at::Tensor b = bias;
  if (b.defined() && !is_aligned(b.const_data_ptr(), 16)) b = b.clone();
  const bool direct = out.is_contiguous(CL) && is_aligned(out.const_data_ptr(), 16);
  const at::Tensor y = direct ? out : at::empty(out.sizes(), out.options().memory_format(CL));

  p.weight = w.const_data_ptr();
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.sm_count = multiprocessor_count();
  // Images [first, first + n) per pass. A pass's images in x, res and y start 16-byte aligned:
  // they are channels_last-dense with channel counts that are multiples of 8.
  for (int64_t first = 0; first < s.N; first += plan.images_per_pass) {
    const int64_t n = std::min(plan.images_per_pass, s.N - first);
    const at::Tensor pass_input = x.narrow(0, packed ? 0 : first, n);  // packed: the reused buffer
    if (packed) pack_windows(s, input.narrow(0, first, n), pass_input, stream);
    p.N = static_cast<int>(n);
    p.input = pass_input.const_data_ptr();
    p.residual = res.defined() ? res.narrow(0, first, n).const_data_ptr() : nullptr;
    p.output = y.narrow(0, first, n).mutable_data_ptr();
    const char* error = with_cutlass_kernel(input.scalar_type(), plan, [&](auto kernel) {
      using Kernel = decltype(kernel);
      const size_t ws_bytes = Kernel::workspace_size(p);
      at::Tensor workspace;
      if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, input.options().dtype(at::kByte));
      return Kernel::run(p, ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, stream);
    });
    TORCH_CHECK(error == nullptr, op, ": ", error);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!direct) out.copy_(y);
}
#endif  // CNNKERNELS_WITH_CUTLASS

// check_conv2d_args, plus the 32-bit ints the kernels and CUTLASS's problem shape index with (a
// stride of 2^32 became 0 there, and CUTLASS divided by it).
ConvShape check_cuda_conv_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const ConvShape s = check_conv2d_args(op, input, weight, bias, residual, stride, padding, dilation, groups);
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  for (int64_t v : {s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.OH, s.OW, s.C / s.groups * s.R * s.S}) {
    TORCH_CHECK(v <= int_max, op, ": sizes of 2^31 or more along one dimension are not supported");
  }
  for (int64_t v : {s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h, s.dil_w}) {
    TORCH_CHECK(v <= int_max, op, ": stride, padding and dilation of 2^31 or more are not supported, got stride=",
                stride, ", padding=", padding, ", dilation=", dilation);
  }
  return s;
}

at::Tensor conv_bias_relu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t groups) {
  const ConvShape s = check_cuda_conv_args(op, input, weight, bias, residual, stride, padding, dilation, groups);
  at::Tensor out = at::empty({s.N, s.K, s.OH, s.OW}, input.options().memory_format(conv_output_memory_format(input, weight)));
  if (out.numel() == 0) return out;

  c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();

  const ConvKernelChoice choice = requested_kernel();
  if (choice != ConvKernelChoice::kGeneric) {
#ifdef CNNKERNELS_WITH_CUTLASS
    const CutlassPlan plan = plan_cutlass(s, /*gemm_routes=*/choice != ConvKernelChoice::kCutlassConvKernel);
    const std::string why = cutlass_unsupported(s, plan, input.scalar_type(), sm90a_code_runs_on(input.get_device()));
    if (why.empty()) {
      run_cutlass(op, s, plan, input, weight, b, residual, out, stream);
      return out;
    }
#else
    const std::string why = "needs a build with CUTLASS (the nvidia-cutlass package's headers)";
#endif
    TORCH_CHECK_NOT_IMPLEMENTED(choice == ConvKernelChoice::kAuto, op, ": CNNKERNELS_CUDA_CONV=",
                                choice == ConvKernelChoice::kCutlass ? "cutlass" : "cutlass-conv",
                                ", but the CUTLASS sm90 kernel ", why);
  }
  launch_conv_generic(op, s, input, weight, b, residual, out, stream);
  return out;
}

at::Tensor conv2d_relu_cuda(const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_bias_relu("conv2d_relu", input, weight, bias, at::Tensor(), stride, padding, dilation, groups);
}

at::Tensor conv2d_add_relu_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& residual,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_bias_relu("conv2d_add_relu", input, weight, bias, residual, stride, padding, dilation, groups);
}

}  // namespace

CutlassPlanSummary describe_cutlass_plan(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                         bool gemm_routes) {
  const ConvShape s =
      check_cuda_conv_args("cutlass_plan", input, weight, c10::nullopt, at::Tensor(), stride, padding, dilation, groups);
  CutlassPlanSummary summary;
#ifdef CNNKERNELS_WITH_CUTLASS
  CutlassPlan plan = plan_cutlass(s, gemm_routes);
  plan.problem.sm_count = 132;  // an H100 SXM's: it only sizes the persistent grid, and 0 would ask the device
  summary.unsupported = cutlass_unsupported(s, plan, input.scalar_type(), /*sm90a_device=*/true);
  summary.kernel = plan.as_gemm ? "gemm" : "conv";
  summary.tile_n = with_cutlass_kernel(input.scalar_type(), plan, [](auto kernel) { return decltype(kernel)::kTileN; });
  summary.packs_windows = plan.packs_windows;
  summary.subsamples = plan.subsamples;
  summary.images_per_pass = plan.images_per_pass;
  const ConvProblem& p = plan.problem;
  summary.problem = {p.N, p.H, p.W, p.C, p.K, p.R, p.S, p.P, p.Q,
                     p.pad_h, p.pad_w, p.stride_h, p.stride_w, p.dil_h, p.dil_w};
  (void)cudaGetLastError();  // the GEMM's arguments ask for the current device, an error without a GPU
#else
  summary.unsupported = "needs a build with CUTLASS (the nvidia-cutlass package's headers)";
#endif
  return summary;
}

}  // namespace cuda
}  // namespace cnnkernels

TORCH_LIBRARY_IMPL(cnnkernels, CUDA, m) {
  m.impl("conv2d_relu", &cnnkernels::cuda::conv2d_relu_cuda);
  m.impl("conv2d_add_relu", &cnnkernels::cuda::conv2d_add_relu_cuda);
}
