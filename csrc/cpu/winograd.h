// Winograd F(4x4, 3x3) for 3x3 stride-1 fp32 convs on the CPU (winograd.cpp says why and how).
#pragma once
#include <ATen/ATen.h>

namespace cnnkernels::cpu {

// Below this many input or output channels the GEMM is too thin for Winograd to pay.
constexpr int64_t kWinogradMinChannels = 16;

// Whether the conv's shape suits Winograd: fp32, 3x3, stride 1, dilation 1, groups 1, enough
// channels and output tiles. Values are checked as it runs.
// CNNKERNELS_CPU_WINOGRAD=0 turns it off.
bool winograd_takes(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The transformed weight U (36, C, K), or an undefined tensor when the weight holds NaN,
// infinities or values too large for the transforms.
at::Tensor winograd_weight(const at::Tensor& weight);

// relu(conv3x3(x, w) + bias + residual) in channels_last, given U = winograd_weight(w) and x dense
// channels_last.
// `residual` may be undefined; when defined it is dense channels_last like x. Returns an
// undefined tensor when x holds values the transforms cannot take (NaN, infinities, huge).
at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& residual, int64_t pad_h, int64_t pad_w);

// How many convs this process has completed through Winograd (tests check the path ran).
int64_t winograd_runs();

}  // namespace cnnkernels::cpu
