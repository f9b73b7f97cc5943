"""Training-mode BatchNorm2d + (residual) + ReLU as Triton kernels, forward and backward: what a
ResNet unit is in train mode, where BN's batch statistics keep the conv from fusing with it.

Eager PyTorch reads the activation three times and writes it twice in the forward (BN's
statistics, BN's normalization, then ReLU or add + ReLU); here two reads and one write:

  forward   1. per-channel partial sums of (x - k) and (x - k)^2 (k = x[0, c, 0, 0], a shift
               that keeps the variance free of cancellation);
            2. their fixed-order totals, and from them mean, variance, scale = weight * invstd
               and shift (one small kernel, not a dozen tiny torch ops: the host cost per BN);
            3. out = relu(x * scale + shift (+ residual)).
  backward  1. per-channel partial sums of g' and g' * (x - mean), g' = grad masked by out > 0;
            2. their totals, the per-channel coefficients below and the weight's and bias's
               gradients (one small kernel);
            3. grad_x = scale * (g' - sum(g') / M - (x - mean) * invstd^2 * sum(g' (x - mean)) / M),
               and g' itself as the residual's gradient when it needs one.

The per-channel partial sums and their totals follow relu_backward.py's scheme (a split that
depends only on the shape, no atomics), so results are the same bits on every run. Running
statistics are updated by the caller (cnnkernels/batch_norm.py) from the returned mean and
biased variance, as F.batch_norm does.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._args import output_memory_format
from . import _runtime
from ._runtime import store_cast
from .relu_backward import dense_strides, grid_split, pixel_tile, program_pixels_and_channels


@triton.jit
def _channel_partial_sums_kernel(
    x_ptr, g_ptr, out_ptr, mean_ptr, partial_a_ptr, partial_b_ptr,
    C, HW, s_per_prog, chunks, stride_n, stride_c, stride_s,
    BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr,
):
    """Forward: sums of (x - k) and (x - k)^2, k = x[0, c, 0, 0]. Backward: sums of g' and
    g' * (x - mean), g' = g where out > 0 or NaN, else 0."""
    s_begin, s_end, cs, base = program_pixels_and_channels(chunks, s_per_prog, HW, stride_n, stride_c, BLOCK_C)
    c_ok = cs < C
    acc_t = tl.float64 if F64 else tl.float32
    if BACKWARD:
        center = tl.load(mean_ptr + cs, mask=c_ok, other=0.0).to(acc_t)
    else:
        center = tl.load(x_ptr + cs.to(tl.int64) * stride_c, mask=c_ok, other=0.0).to(acc_t)
    acc_a = tl.zeros((BLOCK_S, BLOCK_C), dtype=acc_t)
    acc_b = tl.zeros((BLOCK_S, BLOCK_C), dtype=acc_t)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs, mask = pixel_tile(s0, HW, cs, C, base, stride_s, BLOCK_S)
        d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t) - center[None, :]
        d = tl.where(mask, d, 0.0)
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t)
            o = tl.load(out_ptr + offs, mask=mask, other=0.0)
            g = tl.where(o <= 0, 0.0, g)
            acc_a += g
            acc_b += g * d
        else:
            acc_a += d
            acc_b += d * d
    at = tl.program_id(0).to(tl.int64) * C + cs
    tl.store(partial_a_ptr + at, tl.sum(acc_a, axis=0), mask=c_ok)
    tl.store(partial_b_ptr + at, tl.sum(acc_b, axis=0), mask=c_ok)


@triton.jit
def _sum_partial_rows(partial_a_ptr, partial_b_ptr, rows, C, cs, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      F64: tl.constexpr):
    """Per-channel totals of the two partial-sum tables (rows x C), in a fixed order."""
    acc_t = tl.float64 if F64 else tl.float32
    acc_a = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    acc_b = tl.zeros((BLOCK_R, BLOCK_C), dtype=acc_t)
    for r0 in range(0, rows, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        mask = (rs[:, None] < rows) & (cs[None, :] < C)
        at = rs[:, None].to(tl.int64) * C + cs[None, :]
        acc_a += tl.load(partial_a_ptr + at, mask=mask, other=0.0)
        acc_b += tl.load(partial_b_ptr + at, mask=mask, other=0.0)
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _invstd(var, eps, F64: tl.constexpr):
    """1 / sqrt(var + eps), with a correctly rounded square root (tl.math.rsqrt is approximate)."""
    if F64:
        root = tl.sqrt(var + eps)  # float64's sqrt is IEEE; sqrt_rn takes float32 only
    else:
        root = tl.sqrt_rn(var + eps)
    return 1.0 / root


@triton.jit
def _forward_stats_kernel(partial_a_ptr, partial_b_ptr, rows, C, x_ptr, stride_c, weight_ptr, bias_ptr, eps, count,
                          mean_ptr, var_ptr, scale_ptr, shift_ptr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    """From the sums of d = x - k and d^2 (k = x[0, c, 0, 0]): the batch mean, the biased variance,
    and the affine map relu's input is x * scale + shift. One launch instead of a dozen tiny ops."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    acc_t = tl.float64 if F64 else tl.float32
    sum_d, sum_d2 = _sum_partial_rows(partial_a_ptr, partial_b_ptr, rows, C, cs, BLOCK_R, BLOCK_C, F64)
    center = tl.load(x_ptr + cs.to(tl.int64) * stride_c, mask=c_ok, other=0.0).to(acc_t)
    mean_d = sum_d / count
    var = sum_d2 / count - mean_d * mean_d
    var = tl.where(var < 0, 0.0, var)  # rounding can take it below 0; NaN stays NaN
    mean = center + mean_d
    scale = tl.load(weight_ptr + cs, mask=c_ok, other=0.0).to(acc_t) * _invstd(var, eps, F64)
    shift = tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(acc_t) - mean * scale
    tl.store(mean_ptr + cs, mean, mask=c_ok)
    tl.store(var_ptr + cs, var, mask=c_ok)
    tl.store(scale_ptr + cs, scale, mask=c_ok)
    tl.store(shift_ptr + cs, shift, mask=c_ok)


@triton.jit
def _backward_coefficients_kernel(partial_a_ptr, partial_b_ptr, rows, C, mean_ptr, var_ptr, weight_ptr, eps, count,
                                  scale_ptr, neg_k_ptr, coef_ptr, grad_weight_ptr, grad_bias_ptr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr,
                                  INTERPRETED: tl.constexpr):
    """From the sums of g' and g' * (x - mean): grad_x = g' * scale + x * neg_k + coef (see the
    module docstring), and the weight's and bias's gradients."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    acc_t = tl.float64 if F64 else tl.float32
    sum_g, sum_gx = _sum_partial_rows(partial_a_ptr, partial_b_ptr, rows, C, cs, BLOCK_R, BLOCK_C, F64)
    mean = tl.load(mean_ptr + cs, mask=c_ok, other=0.0)
    invstd = _invstd(tl.load(var_ptr + cs, mask=c_ok, other=0.0), eps, F64)
    scale = tl.load(weight_ptr + cs, mask=c_ok, other=0.0).to(acc_t) * invstd
    k = scale * invstd * invstd * sum_gx / count
    tl.store(scale_ptr + cs, scale, mask=c_ok)
    tl.store(neg_k_ptr + cs, -k, mask=c_ok)
    tl.store(coef_ptr + cs, mean * k - scale * sum_g / count, mask=c_ok)
    wdtype = grad_weight_ptr.dtype.element_ty
    tl.store(grad_weight_ptr + cs, store_cast(sum_gx * invstd, wdtype, INTERPRETED), mask=c_ok)
    tl.store(grad_bias_ptr + cs, store_cast(sum_g, wdtype, INTERPRETED), mask=c_ok)


@triton.jit
def _bn_elementwise_kernel(
    x_ptr, g_ptr, out_ptr, res_ptr, dst_ptr, dst_res_ptr, scale_ptr, shift_ptr, coef_ptr,
    C, HW, s_per_prog, chunks, stride_n, stride_c, stride_s,
    BACKWARD: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    F64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Forward: dst = relu(x * scale + shift (+ res)). Backward: g' = g masked by out > 0;
    dst = g' * scale + x * shift + coef (per-channel terms prepared on the host), dst_res = g'."""
    s_begin, s_end, cs, base = program_pixels_and_channels(chunks, s_per_prog, HW, stride_n, stride_c, BLOCK_C)
    c_ok = cs < C
    acc_t = tl.float64 if F64 else tl.float32
    scale = tl.load(scale_ptr + cs, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(shift_ptr + cs, mask=c_ok, other=0.0)[None, :]
    if BACKWARD:
        coef = tl.load(coef_ptr + cs, mask=c_ok, other=0.0)[None, :]
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs, mask = pixel_tile(s0, HW, cs, C, base, stride_s, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
            o = tl.load(out_ptr + offs, mask=mask, other=0.0)
            g = tl.where(o <= 0, tl.zeros_like(g), g)
            if HAS_RES:
                tl.store(dst_res_ptr + offs, g, mask=mask)
            y = g.to(acc_t) * scale + x * shift + coef
        else:
            y = x * scale + shift
            if HAS_RES:
                y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc_t)
            y = tl.where(y < 0, 0.0, y)  # NaN passes through, like torch.relu
        tl.store(dst_ptr + offs, store_cast(y, dst_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def _layout(t):
    """(dense tensor in its memory format, N, C, HW, strides (n, c, pixel), channels_last)."""
    fmt = output_memory_format(t)
    t = t.contiguous(memory_format=fmt)
    N, C, H, W = t.shape
    channels_last = fmt == torch.channels_last
    return t, N, C, H * W, dense_strides(N, C, H * W, channels_last), channels_last


_STATS_BLOCK_R, _STATS_BLOCK_C = 64, 32


def _channel_partials(x, g, out, mean, backward):
    """Launches _channel_partial_sums_kernel: (dense x, C, partial_a, partial_b, rows), the two
    (rows x C) tables of per-program sums in the accumulation dtype."""
    x, N, C, HW, strides, channels_last = _layout(x)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_s, block_c, s_per_prog, chunks = grid_split(N, C, HW, channels_last)
    partial_a = torch.empty((N * chunks, C), dtype=acc_dtype, device=x.device)
    partial_b = torch.empty_like(partial_a)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = x if g is None else g.contiguous(memory_format=fmt)
    out = x if out is None else out.contiguous(memory_format=fmt)
    mean = partial_a if mean is None else mean
    with _runtime.device_guard(x):
        _runtime.launcher(_channel_partial_sums_kernel)[(N * chunks, triton.cdiv(C, block_c))](
            x, g, out, mean, partial_a, partial_b, C, HW, s_per_prog, chunks, *strides,
            BACKWARD=backward, BLOCK_S=block_s, BLOCK_C=block_c, F64=acc_dtype == torch.float64, num_warps=4)
    return x, C, partial_a, partial_b, N * chunks


def _elementwise(x, g, out, residual, scale, shift, coef, backward, want_residual_grad):
    x, N, C, HW, strides, channels_last = _layout(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block_s, block_c, s_per_prog, chunks = grid_split(N, C, HW, channels_last)
    dst = torch.empty_like(x, memory_format=fmt)
    dst_res = torch.empty_like(x, memory_format=fmt) if want_residual_grad else dst
    g = x if g is None else g.contiguous(memory_format=fmt)
    out = x if out is None else out.contiguous(memory_format=fmt)
    res = x if residual is None else residual.contiguous(memory_format=fmt)
    with _runtime.device_guard(x):
        _runtime.launcher(_bn_elementwise_kernel)[(N * chunks, triton.cdiv(C, block_c))](
            x, g, out, res, dst, dst_res, scale, shift, scale if coef is None else coef,
            C, HW, s_per_prog, chunks, *strides,
            BACKWARD=backward, HAS_RES=(want_residual_grad if backward else residual is not None),
            BLOCK_S=block_s, BLOCK_C=block_c, F64=x.dtype == torch.float64,
            INTERPRETED=_runtime.is_interpreted(_bn_elementwise_kernel), num_warps=4)
    return dst, (dst_res if want_residual_grad else None)


def _check(op, x, weight, bias, residual):
    if x.dim() != 4:
        raise RuntimeError(f"{op} (Triton): expected 4-D input, got {x.dim()}-D")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (x.shape[1],):
            raise RuntimeError(f"{op} (Triton): expected {name} of size [{x.shape[1]}], got {list(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise RuntimeError(f"{op} (Triton): expected residual of size {list(x.shape)}, got {list(residual.shape)}")
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")


@torch.library.triton_op("cnnkernels::batch_norm_relu_train_triton", mutates_args=())
def batch_norm_relu_train_triton(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 residual: Optional[torch.Tensor], eps: float) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """(relu(batch_norm(input) * weight + bias (+ residual)), batch mean, biased batch variance)."""
    _check("batch_norm_relu_train", input, weight, bias, residual)
    C = input.shape[1]
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if not _runtime.should_launch(_channel_partial_sums_kernel, input, weight, bias, residual):
        out = torch.empty_like(input, memory_format=output_memory_format(input))
        return out, input.new_empty(C, dtype=acc_dtype), input.new_empty(C, dtype=acc_dtype)
    count = input.numel() // C
    x, C, partial_a, partial_b, rows = _channel_partials(input, None, None, None, backward=False)
    # mean and var are outputs: their own tensors (a custom op's outputs may not alias each other).
    mean, var = (torch.empty(C, dtype=acc_dtype, device=input.device) for _ in range(2))
    scale, shift = torch.empty((2, C), dtype=acc_dtype, device=input.device).unbind(0)
    with _runtime.device_guard(x):
        _runtime.launcher(_forward_stats_kernel)[(triton.cdiv(C, _STATS_BLOCK_C),)](
            partial_a, partial_b, rows, C, x, x.stride(1), weight, bias, eps, count, mean, var, scale, shift,
            BLOCK_R=_STATS_BLOCK_R, BLOCK_C=_STATS_BLOCK_C, F64=acc_dtype == torch.float64, num_warps=4)
    out, _ = _elementwise(input, None, None, residual, scale, shift, None, backward=False, want_residual_grad=False)
    return out, mean, var


@torch.library.triton_op("cnnkernels::batch_norm_relu_backward_triton", mutates_args=())
def batch_norm_relu_backward_triton(grad: torch.Tensor, input: torch.Tensor, output: torch.Tensor,
                                    mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, eps: float,
                                    residual_grad: bool) -> List[torch.Tensor]:
    """[grad_input, grad_weight, grad_bias, grad_residual (empty unless residual_grad)]."""
    C = input.shape[1]
    fmt = output_memory_format(input)
    if not _runtime.should_launch(_channel_partial_sums_kernel, grad, input, output, mean):
        empty = torch.empty_like(input, memory_format=fmt)
        return [empty, weight.new_empty(C), weight.new_empty(C),
                torch.empty_like(empty) if residual_grad else input.new_empty(0)]
    count = input.numel() // C
    x, C, partial_a, partial_b, rows = _channel_partials(input, grad, output, mean, backward=True)
    scale, neg_k, coef = torch.empty((3, C), dtype=mean.dtype, device=input.device).unbind(0)
    grad_weight, grad_bias = weight.new_empty(C), weight.new_empty(C)
    with _runtime.device_guard(x):
        _runtime.launcher(_backward_coefficients_kernel)[(triton.cdiv(C, _STATS_BLOCK_C),)](
            partial_a, partial_b, rows, C, mean, var, weight, eps, count, scale, neg_k, coef, grad_weight, grad_bias,
            BLOCK_R=_STATS_BLOCK_R, BLOCK_C=_STATS_BLOCK_C, F64=mean.dtype == torch.float64,
            INTERPRETED=_runtime.is_interpreted(_backward_coefficients_kernel), num_warps=4)
    grad_input, grad_residual = _elementwise(input, grad, output, None, scale, neg_k, coef, backward=True,
                                             want_residual_grad=residual_grad)
    return [grad_input, grad_weight, grad_bias, grad_residual if residual_grad else input.new_empty(0)]


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, eps = inputs
    out, mean, var = output
    ctx.save_for_backward(input, out, mean, var, weight)
    ctx.eps = eps
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, var)


def _backward(ctx, grad, _grad_mean, _grad_var):
    input, out, mean, var, weight = ctx.saved_tensors
    wants_residual = ctx.has_residual and ctx.needs_input_grad[3]
    grad_input, grad_weight, grad_bias, grad_residual = batch_norm_relu_backward_triton(
        grad, input, out, mean, var, weight, ctx.eps, wants_residual)
    return grad_input, grad_weight, grad_bias, grad_residual if wants_residual else None, None


torch.library.register_autograd("cnnkernels::batch_norm_relu_train_triton", _backward, setup_context=_setup_context)
