"""The backward of the fused ops' ReLU as Triton kernels: the masked gradient and the bias gradient
(its per-channel sum) in one pass over memory, plus a tiny pass over per-program partial sums.

Each program of the first kernel owns one image's run of pixels and a strip of channels and
writes one partial sum per channel; the second kernel adds the partials in a fixed order. The
split depends only on the tensor's shape, so the result is the same bits on every run
(torch.use_deterministic_algorithms needs nothing more), with no atomics.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._args import output_memory_format
from . import _runtime
from ._runtime import store_cast

_PARTIAL_ROWS = 1024  # at most about this many partial sums per channel after the first pass


@triton.jit
def program_pixels_and_channels(chunks, s_per_prog, HW, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """This program's share of a grid_split launch: (its first pixel, one past its last, its
    channels, their offset in its image). Axis 0 runs over (image, chunk of pixels) pairs, axis 1
    over blocks of BLOCK_C channels."""
    row = tl.program_id(0)
    n = row // chunks
    s_begin = (row % chunks) * s_per_prog
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = n.to(tl.int64) * stride_n + cs[None, :].to(tl.int64) * stride_c
    return s_begin, tl.minimum(s_begin + s_per_prog, HW), cs, base


@triton.jit
def pixel_tile(s0, HW, cs, C, base, stride_s, BLOCK_S: tl.constexpr):
    """(offsets, mask) of the BLOCK_S pixels from s0 by the program's channels; int64 offsets."""
    ss = s0 + tl.arange(0, BLOCK_S)
    return base + ss[:, None].to(tl.int64) * stride_s, (ss[:, None] < HW) & (cs[None, :] < C)


@triton.jit
def _mask_and_partial_sums_kernel(
    grad_ptr, out_ptr, grad_in_ptr, partial_ptr, C, HW, s_per_prog, chunks, stride_n, stride_c, stride_s,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr,
):
    s_begin, s_end, cs, base = program_pixels_and_channels(chunks, s_per_prog, HW, stride_n, stride_c, BLOCK_C)
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float64 if F64 else tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs, mask = pixel_tile(s0, HW, cs, C, base, stride_s, BLOCK_S)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(o <= 0, tl.zeros_like(g), g)  # a NaN output lets the gradient through
        tl.store(grad_in_ptr + offs, g, mask=mask)
        acc += g.to(acc.dtype)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * C + cs, tl.sum(acc, axis=0), mask=cs < C)


@triton.jit
def _sum_partials_kernel(partial_ptr, grad_bias_ptr, rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         F64: tl.constexpr, INTERPRETED: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64 if F64 else tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        mask = (rs[:, None] < rows) & (cs[None, :] < C)
        acc += tl.load(partial_ptr + rs[:, None].to(tl.int64) * C + cs[None, :], mask=mask, other=0.0)
    tl.store(grad_bias_ptr + cs, store_cast(tl.sum(acc, axis=0), grad_bias_ptr.dtype.element_ty, INTERPRETED),
             mask=cs < C)


def _tiles(channels_last: bool, C: int):
    """(BLOCK_S, BLOCK_C): the contiguous axis gets the long side, 4096 elements a tile at most."""
    if channels_last:
        block_c = min(triton.next_power_of_2(max(C, 1)), 128)
        return max(4096 // block_c // 4, 1), block_c  # 1024 elements: registers for two tiles + acc
    return 256, 4


def grid_split(N, C, HW, channels_last):
    """How the per-channel reductions here and in batch_norm.py split (N, C, H*W): (BLOCK_S,
    BLOCK_C, pixels per program, programs per image). A function of the shape only, so the sums'
    order is fixed. At most _PARTIAL_ROWS partial sums per channel, and one per 64 pixels or
    fewer, so that the fp32 partials stay a few percent of the tensor's bytes when images are small."""
    block_s, block_c = _tiles(channels_last, C)
    partial_rows = max(1, min(_PARTIAL_ROWS, N * HW // 64))
    s_per_prog = max(1, min(triton.cdiv(HW, block_s), triton.cdiv(N * HW, partial_rows * block_s))) * block_s
    return block_s, block_c, s_per_prog, triton.cdiv(HW, s_per_prog)


def dense_strides(N, C, HW, channels_last):
    """(image, channel, pixel) strides of a dense NCHW or channels_last tensor, from its shape: a
    size-1 dimension's own stride may be anything."""
    return (HW * C, 1, C) if channels_last else (C * HW, HW, 1)


@torch.library.triton_op("cnnkernels::relu_backward_bias_grad_triton", mutates_args=())
def relu_backward_bias_grad_triton(grad: torch.Tensor, output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad where output > 0 or NaN else 0, its sum over N, H, W): the ReLU's and the bias's gradients."""
    if output.dim() != 4 or grad.shape != output.shape:
        raise RuntimeError(f"relu_backward_bias_grad (Triton): expected 4-D grad and output of the same size, got "
                           f"{list(grad.shape)} and {list(output.shape)}")
    if grad.dtype != output.dtype or grad.device != output.device:
        raise RuntimeError("relu_backward_bias_grad (Triton): grad and output must have the same dtype and device, "
                           f"got {grad.dtype} on {grad.device} and {output.dtype} on {output.device}")
    fmt = output_memory_format(output)
    g = grad.contiguous(memory_format=fmt)
    o = output.contiguous(memory_format=fmt)
    grad_input = torch.empty_like(o, memory_format=fmt)
    N, C, H, W = o.shape
    HW = H * W
    if not _runtime.should_launch(_mask_and_partial_sums_kernel, g, o) or grad_input.numel() == 0:
        return grad_input, torch.zeros(C, dtype=o.dtype, device=o.device)
    channels_last = fmt == torch.channels_last
    block_s, block_c, s_per_prog, chunks = grid_split(N, C, HW, channels_last)
    f64 = o.dtype == torch.float64
    partial = torch.empty((N * chunks, C), dtype=torch.float64 if f64 else torch.float32, device=o.device)
    grad_bias = torch.empty(C, dtype=o.dtype, device=o.device)
    with _runtime.device_guard(o):
        _runtime.launcher(_mask_and_partial_sums_kernel)[(N * chunks, triton.cdiv(C, block_c))](
            g, o, grad_input, partial, C, HW, s_per_prog, chunks, *dense_strides(N, C, HW, channels_last),
            BLOCK_S=block_s, BLOCK_C=block_c, F64=f64, num_warps=4)
        _runtime.launcher(_sum_partials_kernel)[(triton.cdiv(C, 32),)](
            partial, grad_bias, N * chunks, C, BLOCK_R=64, BLOCK_C=32, F64=f64,
            INTERPRETED=_runtime.is_interpreted(_sum_partials_kernel), num_warps=4)
    return grad_input, grad_bias
