"""The backward of the fused ops' ReLU as Triton kernels: the masked gradient and the bias gradient
(its per-channel sum) in one pass over memory, plus a tiny pass over per-program partial sums.

Each program of the first kernel owns one image's run of pixels and a strip of channels and
writes one partial sum per channel; the second kernel adds the partials in a fixed order. The
split depends only on the tensor's shape, so the result is the same bits on every run
(torch.use_deterministic_algorithms needs nothing more), with no atomics.
"""
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from .._args import memory_format_of, shape_cached
from . import _runtime
from ._runtime import store_cast

_PARTIAL_ROWS = 1024  # at most about this many partial sums per channel after the first pass
# Elements of a (BLOCK_S x BLOCK_C) tile: 1024 is one 16-byte load per thread (4 warps, 16-bit
# dtypes) per loop step, likely too few in flight to saturate HBM; never measured against larger
# tiles on a GPU. benchmarks/bn_tiles.py sweeps it (clear _WALKS after changing it).
TILE_ELEMENTS = 1024
# The fixed-order totals of a (rows x C) table of partial sums (sum_partial_rows): one program per
# SUM_BLOCK_C channels walks all rows, SUM_BLOCK_R per step. It reads a few hundred KB from L2 in
# dependent steps, so it is latency-bound: many rows per step (4 steps for 1024 rows, against 16
# at 64 rows) and narrow channel strips (4 programs for 64 channels) shorten it. Unmeasured on a
# GPU, like TILE_ELEMENTS; the GPU check's profile step shows these kernels' times.
SUM_BLOCK_R, SUM_BLOCK_C, SUM_WARPS = 256, 16, 8


@triton.jit
def program_pixels_and_channels(chunks, s_per_prog, HW, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """This program's share of a ChannelWalk launch: (its first pixel, one past its last, its
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
def sum_partial_rows(partial_ptr, rows, C, cs, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    """Per-channel totals of channels `cs` of a (rows x C) table of partial sums, in a fixed order."""
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64 if F64 else tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        mask = (rs[:, None] < rows) & (cs[None, :] < C)
        acc += tl.load(partial_ptr + rs[:, None].to(tl.int64) * C + cs[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _sum_partials_kernel(partial_ptr, grad_bias_ptr, rows, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         F64: tl.constexpr, INTERPRETED: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = sum_partial_rows(partial_ptr, rows, C, cs, BLOCK_R, BLOCK_C, F64)
    tl.store(grad_bias_ptr + cs, store_cast(total, grad_bias_ptr.dtype.element_ty, INTERPRETED), mask=cs < C)


def _tiles(channels_last: bool, C: int):
    """(BLOCK_S, BLOCK_C) with TILE_ELEMENTS elements: the contiguous axis gets the long side."""
    if channels_last:
        block_c = min(_runtime.next_power_of_2(max(C, 1)), 128)
        return max(TILE_ELEMENTS // block_c, 1), block_c
    return TILE_ELEMENTS // 4, 4


class ChannelWalk(NamedTuple):
    """How the per-channel kernels here and in batch_norm.py walk a tensor of some shape and
    memory format: tiles, and the split of (N, C, H*W) over programs. A function of the shape and
    format only, so the order of the sums, and so their bits, are fixed."""
    fmt: torch.memory_format  # the layout the kernels read and write (the tensor's own, as torch keeps it)
    N: int
    C: int
    HW: int
    strides: tuple  # (image, channel, pixel) strides of a dense tensor in `fmt`
    block_s: int
    block_c: int
    s_per_prog: int  # pixels per program
    chunks: int  # programs per image
    grid: tuple  # (N * chunks, channel blocks): axis 0 is also the partial sums' row

    @property
    def partial_rows(self):
        return self.grid[0]


_WALKS: dict = {}


def channel_walk(t: torch.Tensor) -> ChannelWalk:
    """The ChannelWalk of 4-D tensors shaped and strided like t."""
    return shape_cached(_WALKS, t, _channel_walk)


def _channel_walk(t):
    """At most _PARTIAL_ROWS partial sums per channel, and one per 64 pixels or fewer, so that
    the fp32 partials stay a few percent of the tensor's bytes when images are small."""
    fmt = memory_format_of(t)
    channels_last = fmt == torch.channels_last
    N, C, H, W = t.shape
    HW = H * W
    block_s, block_c = _tiles(channels_last, C)
    partial_rows = max(1, min(_PARTIAL_ROWS, N * HW // 64))
    s_per_prog = max(1, min(_runtime.cdiv(HW, block_s), _runtime.cdiv(N * HW, partial_rows * block_s))) * block_s
    chunks = _runtime.cdiv(HW, s_per_prog)
    strides = (HW * C, 1, C) if channels_last else (C * HW, HW, 1)
    return ChannelWalk(fmt, N, C, HW, strides, block_s, block_c, s_per_prog, chunks,
                       (N * chunks, _runtime.cdiv(C, block_c)))


@torch.library.triton_op("cnnkernels::relu_backward_bias_grad_triton", mutates_args=())
def relu_backward_bias_grad_triton(grad: torch.Tensor, output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad where output > 0 or NaN else 0, its sum over N, H, W): the ReLU's and the bias's gradients."""
    if output.dim() != 4 or grad.shape != output.shape:
        raise RuntimeError(f"relu_backward_bias_grad (Triton): expected 4-D grad and output of the same size, got "
                           f"{list(grad.shape)} and {list(output.shape)}")
    if grad.dtype != output.dtype or grad.device != output.device:
        raise RuntimeError("relu_backward_bias_grad (Triton): grad and output must have the same dtype and device, "
                           f"got {grad.dtype} on {grad.device} and {output.dtype} on {output.device}")
    walk = channel_walk(output)
    g = grad.contiguous(memory_format=walk.fmt)
    o = output.contiguous(memory_format=walk.fmt)
    grad_input = torch.empty_like(o, memory_format=walk.fmt)
    if not _runtime.should_launch(_mask_and_partial_sums_kernel, g, o) or grad_input.numel() == 0:
        return grad_input, torch.zeros(walk.C, dtype=o.dtype, device=o.device)
    f64 = o.dtype == torch.float64
    partial = torch.empty((walk.partial_rows, walk.C), dtype=torch.float64 if f64 else torch.float32, device=o.device)
    grad_bias = torch.empty(walk.C, dtype=o.dtype, device=o.device)
    with _runtime.device_guard(o):
        _runtime.launcher(_mask_and_partial_sums_kernel)[walk.grid](
            g, o, grad_input, partial, walk.C, walk.HW, walk.s_per_prog, walk.chunks, *walk.strides,
            BLOCK_S=walk.block_s, BLOCK_C=walk.block_c, F64=f64, num_warps=4)
        _runtime.launcher(_sum_partials_kernel)[(_runtime.cdiv(walk.C, SUM_BLOCK_C),)](
            partial, grad_bias, walk.partial_rows, walk.C, BLOCK_R=SUM_BLOCK_R, BLOCK_C=SUM_BLOCK_C, F64=f64,
            INTERPRETED=_runtime.is_interpreted(_sum_partials_kernel), num_warps=SUM_WARPS)
    return grad_input, grad_bias
