"""Training-mode BatchNorm2d + (residual) + ReLU as Triton kernels, forward and backward: what a
ResNet unit is in train mode, where BN's batch statistics keep the conv from fusing with it.

Eager PyTorch reads the activation three times and writes it twice in the forward (BN's
statistics, BN's normalization, then ReLU or add + ReLU); here two reads and one write:

  forward   1. per-channel partial sums of (x - k) and (x - k)^2 (k = x[0, c, 0, 0], a shift
               that keeps the variance free of cancellation);
            2. their fixed-order totals, and from them mean, variance, scale = weight * invstd
               and shift, and the running statistics' update (one small kernel, not a dozen
               tiny torch ops: the host cost per BN);
            3. out = relu(x * scale + shift (+ residual)).
  backward  1. per-channel partial sums of g' and g' * (x - mean), g' = grad masked by out > 0;
            2. their totals, the per-channel coefficients below and the weight's and bias's
               gradients (one small kernel);
            3. grad_x = scale * (g' - sum(g') / M - (x - mean) * invstd^2 * sum(g' (x - mean)) / M),
               and g' itself as the residual's gradient when it needs one.

The per-channel partial sums and their totals follow relu_backward.py's scheme (a split that
depends only on the shape, no atomics), so results are the same bits on every run. Running
statistics are updated in place as F.batch_norm updates them, with the momentum factor the
caller (cnnkernels/batch_norm.py) works out as nn.BatchNorm2d does. The per-channel vectors
between the kernels live in one buffer per pass: fewer allocations, as the host cost of a
BN counts in a training step.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _runtime
from ._runtime import store_cast
from .relu_backward import (SUM_BLOCK_C, SUM_BLOCK_R, SUM_WARPS, ChannelWalk, channel_walk, pixel_tile,
                            program_pixels_and_channels, sum_partial_rows)


@triton.jit
def _channel_partial_sums_kernel(
    x_ptr, g_ptr, out_ptr, mean_ptr, partial_ptr,
    C, HW, s_per_prog, chunks, stride_n, stride_c, stride_s,
    BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr,
):
    """Two (programs x C) tables, one after the other at partial_ptr. Forward: sums of (x - k)
    and (x - k)^2, k = x[0, c, 0, 0]. Backward: sums of g' and g' * (x - mean), g' = g where
    out > 0 or NaN, else 0."""
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
    table = tl.num_programs(0).to(tl.int64) * C
    tl.store(partial_ptr + at, tl.sum(acc_a, axis=0), mask=c_ok)
    tl.store(partial_ptr + table + at, tl.sum(acc_b, axis=0), mask=c_ok)


@triton.jit
def _invstd(var, eps, F64: tl.constexpr):
    """1 / sqrt(var + eps), with a correctly rounded square root (tl.math.rsqrt is approximate)."""
    if F64:
        root = tl.sqrt(var + eps)  # float64's sqrt is IEEE; sqrt_rn takes float32 only
    else:
        root = tl.sqrt_rn(var + eps)
    return 1.0 / root


@triton.jit
def _forward_stats_kernel(partial_ptr, rows, C, x_ptr, stride_c, weight_ptr, bias_ptr, eps, count,
                          mean_ptr, var_ptr, coef_ptr, running_mean_ptr, running_var_ptr, momentum,
                          UPDATE_RUNNING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          F64: tl.constexpr, INTERPRETED: tl.constexpr):
    """From the sums of d = x - k and d^2 (k = x[0, c, 0, 0]): the batch mean, the biased variance,
    the affine map relu's input is x * scale + shift (coef = [scale, shift]), and the running
    statistics moved `momentum` of the way to the batch's (with the unbiased variance)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    acc_t = tl.float64 if F64 else tl.float32
    sum_d = sum_partial_rows(partial_ptr, rows, C, cs, BLOCK_R, BLOCK_C, F64)
    sum_d2 = sum_partial_rows(partial_ptr + tl.cast(rows, tl.int64) * C, rows, C, cs, BLOCK_R, BLOCK_C, F64)
    center = tl.load(x_ptr + cs.to(tl.int64) * stride_c, mask=c_ok, other=0.0).to(acc_t)
    mean_d = sum_d / count
    var = sum_d2 / count - mean_d * mean_d
    var = tl.where(var < 0, 0.0, var)  # rounding can take it below 0; NaN stays NaN
    mean = center + mean_d
    scale = tl.load(weight_ptr + cs, mask=c_ok, other=0.0).to(acc_t) * _invstd(var, eps, F64)
    shift = tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(acc_t) - mean * scale
    tl.store(mean_ptr + cs, mean, mask=c_ok)
    tl.store(var_ptr + cs, var, mask=c_ok)
    tl.store(coef_ptr + cs, scale, mask=c_ok)
    tl.store(coef_ptr + C + cs, shift, mask=c_ok)
    if UPDATE_RUNNING:
        rdtype = running_mean_ptr.dtype.element_ty
        old_mean = tl.load(running_mean_ptr + cs, mask=c_ok, other=0.0).to(acc_t)
        old_var = tl.load(running_var_ptr + cs, mask=c_ok, other=0.0).to(acc_t)
        unbiased = var * count / (count - 1)
        tl.store(running_mean_ptr + cs, store_cast(old_mean + momentum * (mean - old_mean), rdtype, INTERPRETED),
                 mask=c_ok)
        tl.store(running_var_ptr + cs, store_cast(old_var + momentum * (unbiased - old_var), rdtype, INTERPRETED),
                 mask=c_ok)


@triton.jit
def _backward_coefficients_kernel(partial_ptr, rows, C, mean_ptr, var_ptr, weight_ptr, eps, count,
                                  coef_ptr, grad_weight_ptr, grad_bias_ptr,
                                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr,
                                  INTERPRETED: tl.constexpr):
    """From the sums of g' and g' * (x - mean): grad_x = g' * scale + x * neg_k + c (coef =
    [scale, neg_k, c]; see the module docstring), and the weight's and bias's gradients."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    acc_t = tl.float64 if F64 else tl.float32
    sum_g = sum_partial_rows(partial_ptr, rows, C, cs, BLOCK_R, BLOCK_C, F64)
    sum_gx = sum_partial_rows(partial_ptr + tl.cast(rows, tl.int64) * C, rows, C, cs, BLOCK_R, BLOCK_C, F64)
    mean = tl.load(mean_ptr + cs, mask=c_ok, other=0.0)
    invstd = _invstd(tl.load(var_ptr + cs, mask=c_ok, other=0.0), eps, F64)
    scale = tl.load(weight_ptr + cs, mask=c_ok, other=0.0).to(acc_t) * invstd
    k = scale * invstd * invstd * sum_gx / count
    tl.store(coef_ptr + cs, scale, mask=c_ok)
    tl.store(coef_ptr + C + cs, -k, mask=c_ok)
    tl.store(coef_ptr + 2 * C + cs, mean * k - scale * sum_g / count, mask=c_ok)
    wdtype = grad_weight_ptr.dtype.element_ty
    tl.store(grad_weight_ptr + cs, store_cast(sum_gx * invstd, wdtype, INTERPRETED), mask=c_ok)
    tl.store(grad_bias_ptr + cs, store_cast(sum_g, wdtype, INTERPRETED), mask=c_ok)


@triton.jit
def _bn_elementwise_kernel(
    x_ptr, g_ptr, out_ptr, res_ptr, dst_ptr, dst_res_ptr, coef_ptr,
    C, HW, s_per_prog, chunks, stride_n, stride_c, stride_s,
    BACKWARD: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    F64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Forward: dst = relu(x * scale + shift (+ res)), coef = [scale, shift]. Backward: g' = g
    masked by out > 0; dst = g' * scale + x * neg_k + c, coef = [scale, neg_k, c]; dst_res = g'."""
    s_begin, s_end, cs, base = program_pixels_and_channels(chunks, s_per_prog, HW, stride_n, stride_c, BLOCK_C)
    c_ok = cs < C
    acc_t = tl.float64 if F64 else tl.float32
    scale = tl.load(coef_ptr + cs, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(coef_ptr + C + cs, mask=c_ok, other=0.0)[None, :]
    if BACKWARD:
        coef = tl.load(coef_ptr + 2 * C + cs, mask=c_ok, other=0.0)[None, :]
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


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _channel_partials(walk: ChannelWalk, x, g, out, mean, backward):
    """Launches _channel_partial_sums_kernel over x, g, out (dense in walk.fmt): the two tables of
    per-program sums, as one (2, walk.partial_rows, C) tensor in the accumulation dtype."""
    acc_dtype = _acc_dtype(x)
    partials = torch.empty((2, walk.partial_rows, walk.C), dtype=acc_dtype, device=x.device)
    _runtime.launcher(_channel_partial_sums_kernel)[walk.grid](
        x, x if g is None else g, x if out is None else out, partials if mean is None else mean, partials,
        walk.C, walk.HW, walk.s_per_prog, walk.chunks, *walk.strides,
        BACKWARD=backward, BLOCK_S=walk.block_s, BLOCK_C=walk.block_c, F64=acc_dtype == torch.float64,
        num_warps=4)
    return partials


def _elementwise(walk: ChannelWalk, x, g, out, residual, coef, backward, want_residual_grad):
    dst = torch.empty_like(x, memory_format=walk.fmt)
    dst_res = torch.empty_like(x, memory_format=walk.fmt) if want_residual_grad else dst
    _runtime.launcher(_bn_elementwise_kernel)[walk.grid](
        x, x if g is None else g, x if out is None else out, x if residual is None else residual, dst, dst_res, coef,
        walk.C, walk.HW, walk.s_per_prog, walk.chunks, *walk.strides,
        BACKWARD=backward, HAS_RES=(want_residual_grad if backward else residual is not None),
        BLOCK_S=walk.block_s, BLOCK_C=walk.block_c, F64=x.dtype == torch.float64,
        INTERPRETED=_runtime.is_interpreted(_bn_elementwise_kernel), num_warps=4)
    return dst, (dst_res if want_residual_grad else None)


def _check(op, x, weight, bias, residual, running_mean, running_var):
    if x.dim() != 4:
        raise RuntimeError(f"{op} (Triton): expected 4-D input, got {x.dim()}-D")
    named = (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var))
    for name, t in named:
        if t is not None and t.shape != (x.shape[1],):
            raise RuntimeError(f"{op} (Triton): expected {name} of size [{x.shape[1]}], got {list(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(f"{op} (Triton): running_mean and running_var must be given together")
    if residual is not None and residual.shape != x.shape:
        raise RuntimeError(f"{op} (Triton): expected residual of size {list(x.shape)}, got {list(residual.shape)}")
    for name, t in named + (("residual", residual),):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{op} (Triton): expected all tensors on {x.device}, but {name} is on {t.device}")
    if x.numel() == 0:
        raise RuntimeError(f"{op} (Triton): expected a non-empty input, got input size {list(x.shape)}")
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")


@torch.library.triton_op("cnnkernels::batch_norm_relu_train_triton", mutates_args=("running_mean", "running_var"))
def batch_norm_relu_train_triton(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 residual: Optional[torch.Tensor], eps: float,
                                 running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                                 momentum: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relu(batch_norm(input) * weight + bias (+ residual)), batch mean, biased batch variance).
    Given running_mean and running_var, moves them `momentum` of the way to the batch's mean and
    unbiased variance, in place. No defaults: torch 2.11's in-place bookkeeping for custom ops
    indexes every mutated argument among the positional ones given (IndexError when omitted)."""
    _check("batch_norm_relu_train", input, weight, bias, residual, running_mean, running_var)
    walk = channel_walk(input)
    C, acc_dtype = walk.C, _acc_dtype(input)
    mean, var = (torch.empty(C, dtype=acc_dtype, device=input.device) for _ in range(2))  # outputs: their own tensors
    if not _runtime.should_launch(_channel_partial_sums_kernel, input, weight, bias, residual):
        return torch.empty_like(input, memory_format=walk.fmt), mean, var
    x = input.contiguous(memory_format=walk.fmt)
    residual = None if residual is None else residual.contiguous(memory_format=walk.fmt)
    coef = torch.empty((2, C), dtype=acc_dtype, device=input.device)
    with _runtime.device_guard(x):
        partials = _channel_partials(walk, x, None, None, None, backward=False)
        _runtime.launcher(_forward_stats_kernel)[(_runtime.cdiv(C, SUM_BLOCK_C),)](
            partials, walk.partial_rows, C, x, walk.strides[1], weight, bias, eps, input.numel() // C,
            mean, var, coef, mean if running_mean is None else running_mean, var if running_var is None else running_var,
            momentum, UPDATE_RUNNING=running_mean is not None, BLOCK_R=SUM_BLOCK_R, BLOCK_C=SUM_BLOCK_C,
            F64=acc_dtype == torch.float64, INTERPRETED=_runtime.is_interpreted(_forward_stats_kernel),
            num_warps=SUM_WARPS)
        out, _ = _elementwise(walk, x, None, None, residual, coef, backward=False, want_residual_grad=False)
    return out, mean, var


@torch.library.triton_op("cnnkernels::batch_norm_relu_backward_triton", mutates_args=())
def batch_norm_relu_backward_triton(grad: torch.Tensor, input: torch.Tensor, output: torch.Tensor,
                                    mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, eps: float,
                                    residual_grad: bool) -> List[torch.Tensor]:
    """[grad_input, grad_weight, grad_bias, grad_residual (empty unless residual_grad)]."""
    walk = channel_walk(input)
    C = walk.C
    grad_weight, grad_bias = weight.new_empty(C), weight.new_empty(C)
    if not _runtime.should_launch(_channel_partial_sums_kernel, grad, input, output, mean):
        grad_input = torch.empty_like(input, memory_format=walk.fmt)
        return [grad_input, grad_weight, grad_bias,
                torch.empty_like(grad_input) if residual_grad else input.new_empty(0)]
    x, g, out = (t.contiguous(memory_format=walk.fmt) for t in (input, grad, output))
    coef = torch.empty((3, C), dtype=mean.dtype, device=input.device)
    with _runtime.device_guard(x):
        partials = _channel_partials(walk, x, g, out, mean, backward=True)
        _runtime.launcher(_backward_coefficients_kernel)[(_runtime.cdiv(C, SUM_BLOCK_C),)](
            partials, walk.partial_rows, C, mean, var, weight, eps, input.numel() // C, coef, grad_weight, grad_bias,
            BLOCK_R=SUM_BLOCK_R, BLOCK_C=SUM_BLOCK_C, F64=mean.dtype == torch.float64,
            INTERPRETED=_runtime.is_interpreted(_backward_coefficients_kernel), num_warps=SUM_WARPS)
        grad_input, grad_residual = _elementwise(walk, x, g, out, None, coef, backward=True,
                                                 want_residual_grad=residual_grad)
    return [grad_input, grad_weight, grad_bias, grad_residual if residual_grad else input.new_empty(0)]


class _BatchNormReLUTrain(torch.autograd.Function):
    """Autograd for the pair of ops above. Not torch.library.register_autograd: that refuses ops
    that mutate an input (the running statistics); torch.compile traces an autograd.Function."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, running_mean, running_var, momentum):
        out, mean, var = _runtime.call_op(batch_norm_relu_train_triton, input, weight, bias, residual, eps,
                                          running_mean, running_var, momentum, mutated=(running_mean, running_var))
        ctx.save_for_backward(input, out, mean, var, weight)
        ctx.eps = eps
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        input, out, mean, var, weight = ctx.saved_tensors
        wants_residual = ctx.has_residual and ctx.needs_input_grad[3]
        if torch.is_grad_enabled():  # create_graph=True: PyTorch's ops, whose gradients have gradients
            grad_residual = torch.ops.aten.threshold_backward(grad, out, 0)
            acc = mean.dtype  # float32 for half inputs, as the kernels compute
            grads = torch.ops.aten.native_batch_norm_backward(
                grad_residual.to(acc), input.to(acc), weight.to(acc), None, None, mean, torch.rsqrt(var + ctx.eps),
                True, ctx.eps, list(ctx.needs_input_grad[:3]))
            grad_input, grad_weight, grad_bias = (None if g is None else g.to(input.dtype) for g in grads)
        else:
            grad_input, grad_weight, grad_bias, grad_residual = _runtime.call_op(
                batch_norm_relu_backward_triton, grad, input, out, mean, var, weight, ctx.eps, wants_residual)
        return grad_input, grad_weight, grad_bias, grad_residual if wants_residual else None, None, None, None, None


def batch_norm_relu_train(input, weight, bias, residual, eps, running_mean=None, running_var=None, momentum=0.0):
    """relu(batch_norm(input) * weight + bias (+ residual)) with batch statistics, differentiable in
    input, weight, bias and residual; updates running_mean and running_var as the op does."""
    return _BatchNormReLUTrain.apply(input, weight, bias, residual, eps, running_mean, running_var, momentum)
