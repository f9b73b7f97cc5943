"""conv2d + bias (+ residual) + ReLU as one Triton implicit-GEMM kernel over NHWC activations.

GEMM view: rows are output pixels (N·OH·OW), columns are output channels of one group, and
the reduction runs over kernel rows, kernel columns and the group's input channels. The
epilogue adds bias and residual, applies ReLU, casts, and stores straight into the output's
memory format, so the output is written once and never read back.

Layouts the kernel wants:
- activations with unit channel stride (NHWC, i.e. channels_last, sliced views included).
  NCHW input is copied to channels_last once per call: one extra read and write of the
  input. channels_last is the fast path; the output is channels_last when the input or weight is.
- weights with (R, S, C/groups) flattened, channel fastest, per output channel: that is a
  channels_last weight, used as is. Other weights are copied to it on each call (see
  `kernel_layout_weight` for why that copy is not cached).
Depthwise convs (one input channel per group) use a separate elementwise kernel.

On Hopper, some tuning candidates move tiles through TMA tensor descriptors built on the host per
call: the weight tiles, the input tiles of 1x1 stride-1 convs (plain GEMMs), and the residual and
output tiles of channels_last outputs. Others (_conv_boxes_kernel, stride-1 convs) make a tile's
rows a box of (images x rows x columns) output pixels, so that each kernel tap's input tile is
one shifted 4-D box of the NHWC input: every operand moves by TMA, and the descriptor's zero fill
is the padding. The tuner keeps them only where they measure faster. Traced calls
(torch.compile) never use them.
"""

import functools
from typing import Any, Callable, List, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .._args import PLAIN_TENSORS, check_image_sizes, check_weight_sizes, conv_output_memory_format, remember
from . import _autotune, _runtime
from ._runtime import store_cast


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _fused_epilogue(
    acc, offs_m, offs_k, M, K, OH, OW,
    bias_ptr, stride_b,
    res_ptr, srn, srk, srh, srw,
    out_ptr, son, sok, soh, sow,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, INTERPRETED: tl.constexpr,
    m0=0, k0=0, O_DESC: tl.constexpr = False, R_DESC: tl.constexpr = False,
):
    """acc[m, k] (+ bias[k]) (+ residual) -> ReLU -> out, at strided NCHW-logical positions; with
    O_DESC / R_DESC, out / res are TMA descriptors of (M, K) matrices, this tile at (m0, k0)."""
    m_ok = offs_m < M
    k_ok = offs_k < K
    n = offs_m // (OH * OW)
    rem = offs_m - n * (OH * OW)
    oh = rem // OW
    ow = rem - oh * OW
    n = n.to(tl.int64)
    oh = oh.to(tl.int64)
    ow = ow.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    mask = m_ok[:, None] & k_ok[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + k64 * stride_b, mask=k_ok, other=0.0)
        acc = acc + b.to(acc.dtype)[None, :]
    if HAS_RES:
        if R_DESC:
            r = res_ptr.load([m0, k0])
        else:
            r_off = (n * srn + oh * srh + ow * srw)[:, None] + (k64 * srk)[None, :]
            r = tl.load(res_ptr + r_off, mask=mask, other=0.0)
        acc = acc + r.to(acc.dtype)
    # Not tl.maximum: `acc < 0` is False for NaN, so NaN passes through like torch.relu.
    acc = tl.where(acc < 0, 0.0, acc)
    if O_DESC:
        out_ptr.store([m0, k0], store_cast(acc, out_ptr.dtype, INTERPRETED))
    else:
        o_off = (n * son + oh * soh + ow * sow)[:, None] + (k64 * sok)[None, :]
        tl.store(out_ptr + o_off, store_cast(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _input_windows(offs_m, OH, OW, stride_h, stride_w, pad_h, pad_w):
    """For output pixels offs_m (n, oh, ow flattened): their image, and the top-left corner of their
    input window, which may lie in the padding."""
    n = offs_m // (OH * OW)
    rem = offs_m - n * (OH * OW)
    oh = rem // OW
    ow = rem - oh * OW
    return n, oh * stride_h - pad_h, ow * stride_w - pad_w


@triton.jit
def _mma(a, b, acc, FMA_F64: tl.constexpr, INTERPRETED: tl.constexpr, ALLOW_TF32: tl.constexpr):
    if FMA_F64:
        # float64 (gradcheck): a plain multiply-reduce, accumulated in float64.
        acc += tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        if INTERPRETED:
            # The interpreter's tl.dot is wrong on bfloat16 operands (triton #11584) and
            # inexact on float16 ones.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ALLOW_TF32:
            # 3xTF32: tensor cores at about fp32 accuracy. Plain TF32 here truncates the operands
            # (cuDNN rounds them), which measured 2.7x cuDNN's TF32 error on an H200, and cuDNN
            # often runs small fp32 convs in IEEE fp32 even with TF32 allowed.
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    H, W, OH, OW, M, Cg, Kg, R, S,
    sxn, sxh, sxw,  # input strides; the channel stride is 1
    swk,  # weight stride between output channels; (r, s, c) is flat with c fastest
    stride_b,
    srn, srk, srh, srw,
    son, sok, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    PADDED: tl.constexpr,  # pad > 0: rows may read outside the image
    FLAT_K: tl.constexpr,  # per kernel row, one reduction index over (s, c): for few channels per group
    EVEN_C: tl.constexpr,  # Cg % BLOCK_K == 0: no channel mask
    FMA_F64: tl.constexpr, ALLOW_TF32: tl.constexpr,
    INTERPRETED: tl.constexpr,  # work around interpreter quirks (dot operands, bf16 rounding)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    # Tensor-memory-accelerator (TMA) loads and stores through host tensor descriptors, where
    # eligible (see _tma_operands): W_DESC: w_ptr is a descriptor of the (K, R*S*Cg) weight matrix;
    # X_DESC (1x1, stride 1, unpadded: a plain GEMM): x_ptr is one of the (N*H*W, C) input matrix;
    # R_DESC / O_DESC: res_ptr / out_ptr are ones of the channels_last (N*OH*OW, K) matrices.
    W_DESC: tl.constexpr = False, X_DESC: tl.constexpr = False, R_DESC: tl.constexpr = False,
    O_DESC: tl.constexpr = False,
):
    # Program -> (group, tile); tiles are ordered GROUP_M rows at a time for L2 reuse of inputs.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(Kg, BLOCK_N)
    tiles = num_pid_m * num_pid_n
    g = pid // tiles
    pid = pid - g * tiles
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < Kg

    n, ih0, iw0 = _input_windows(offs_m, OH, OW, stride_h, stride_w, pad_h, pad_w)
    if not X_DESC:
        # int64: activations can exceed 2**31 elements.
        x_rows = x_ptr + (n.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw + g * Cg)
    if not W_DESC:
        w_cols = w_ptr + (g * Kg + offs_n).to(tl.int64) * swk
    # Descriptor loads zero-fill outside the matrix: rows past M or K, columns past the reduction.
    w_row0 = g * Kg + pid_n * BLOCK_N

    if FMA_F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        # Few channels per group (stems): per kernel row r, one reduction index j over (kernel
        # column, channel), channel fastest, so that the image-row bounds are checked per pixel
        # rather than per element. One flat loop over (r, j block), as below.
        SC = S * Cg
        j_blocks = tl.cdiv(SC, BLOCK_K)
        for t in range(0, R * j_blocks):
            r = t // j_blocks
            j0 = (t - r * j_blocks) * BLOCK_K
            j = j0 + offs_c
            j_ok = j < SC
            s = j // Cg
            c = j - s * Cg
            dw = s * dil_w
            a_ptrs = x_rows[:, None] + (r * dil_h).to(tl.int64) * sxh + (dw.to(tl.int64) * sxw + c)[None, :]
            row_ok = m_ok
            if PADDED:
                ih = ih0 + r * dil_h
                row_ok = row_ok & (ih >= 0) & (ih < H)
            a_mask = row_ok[:, None] & j_ok[None, :]
            if PADDED:
                iw = iw0[:, None] + dw[None, :]
                a_mask = a_mask & (iw >= 0) & (iw < W)
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if W_DESC:
                b = w_ptr.load([w_row0, r * SC + j0]).T
            else:
                b = tl.load(w_cols[None, :] + (r * SC + j)[:, None], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, FMA_F64, INTERPRETED, ALLOW_TF32)
    else:
        # One flat loop over (r, s, channel block) so the compiler can pipeline it.
        c_blocks = tl.cdiv(Cg, BLOCK_K)
        for t in range(0, R * S * c_blocks):
            rs = t // c_blocks
            c0 = (t - rs * c_blocks) * BLOCK_K
            c = c0 + offs_c
            if X_DESC:
                a = x_ptr.load([pid_m * BLOCK_M, g * Cg + c0])
            else:
                r = rs // S
                s = rs - r * S
                a_ptrs = x_rows[:, None] + ((r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw) + c[None, :]
                a_mask = m_ok[:, None]
                if PADDED:
                    ih = ih0 + r * dil_h
                    iw = iw0 + s * dil_w
                    a_mask = a_mask & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
                if not EVEN_C:
                    a_mask = a_mask & (c < Cg)[None, :]
                a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if W_DESC:
                b = w_ptr.load([w_row0, rs * Cg + c0]).T
            else:
                b_mask = n_ok[None, :]
                if not EVEN_C:
                    b_mask = b_mask & (c < Cg)[:, None]
                b = tl.load(w_cols[None, :] + (rs * Cg + c)[:, None], mask=b_mask, other=0.0)
            acc = _mma(a, b, acc, FMA_F64, INTERPRETED, ALLOW_TF32)

    _fused_epilogue(
        acc, offs_m, g * Kg + offs_n, M, (g + 1) * Kg, OH, OW,
        bias_ptr, stride_b, res_ptr, srn, srk, srh, srw, out_ptr, son, sok, soh, sow,
        HAS_BIAS, HAS_RES, INTERPRETED, pid_m * BLOCK_M, w_row0, O_DESC, R_DESC,
    )


@triton.jit
def _conv_boxes_kernel(
    x_desc, w_desc, bias_ptr, res_desc, out_desc,
    TILES, H_TILES, W_TILES, Cg, Kg, R, S, stride_b, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, INTERPRETED: tl.constexpr,
    BOX_N: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """The stride-1, groups-1 conv with every operand moved by TMA (Hopper tuning candidates).

    A tile's rows are a (BOX_N images x BOX_H rows x BOX_W columns) box of output pixels. For
    kernel tap (r, s) they read the same box of the NHWC input shifted by (r * dil - pad,
    s * dil - pad): one 4-D descriptor load, whose zero fill outside the tensor is the conv's
    padding (coordinates may be negative). Boxes never cross images, and the output store is
    clipped at the tensor's edges. x_desc, res_desc and out_desc are (N, H, W, C) descriptors,
    w_desc the (K, R*S*Cg) weight matrix's; channels past C read zeros, so the weight columns a
    channel block reads past its tap meet zeros.

    One program per tile of the TILES or, PERSISTENT, one per SM walking tiles pid, pid +
    programs, ... in a loop Triton flattens, so that a tile's epilogue overlaps the next tile's
    first loads (short reductions, as in 1x1 and 64-channel layers, are mostly that). The loop
    is not there otherwise: around a single tile it costs registers and shared memory.
    """
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), TILES, tl.num_programs(0), flatten=True):
            _conv_box_tile(x_desc, w_desc, bias_ptr, res_desc, out_desc, tile, H_TILES, W_TILES, Cg, Kg, R, S,
                           stride_b, pad_h, pad_w, dil_h, dil_w, HAS_BIAS, HAS_RES, INTERPRETED,
                           BOX_N, BOX_H, BOX_W, BLOCK_N, BLOCK_K)
    else:
        _conv_box_tile(x_desc, w_desc, bias_ptr, res_desc, out_desc, tl.program_id(0), H_TILES, W_TILES, Cg, Kg,
                       R, S, stride_b, pad_h, pad_w, dil_h, dil_w, HAS_BIAS, HAS_RES, INTERPRETED,
                       BOX_N, BOX_H, BOX_W, BLOCK_N, BLOCK_K)


@triton.jit
def _conv_box_tile(
    x_desc, w_desc, bias_ptr, res_desc, out_desc, tile, H_TILES, W_TILES, Cg, Kg, R, S,
    stride_b, pad_h, pad_w, dil_h, dil_w, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, INTERPRETED: tl.constexpr,
    BOX_N: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One output tile of _conv_boxes_kernel: its reduction over taps and channel blocks, then
    bias, residual, ReLU and the store."""
    BLOCK_M: tl.constexpr = BOX_N * BOX_H * BOX_W
    k_tiles = tl.cdiv(Kg, BLOCK_N)
    k0 = (tile % k_tiles) * BLOCK_N  # output-channel tiles of one box run next to each other
    box = tile // k_tiles
    n0 = (box // (H_TILES * W_TILES)) * BOX_N
    oh0 = ((box // W_TILES) % H_TILES) * BOX_H
    ow0 = (box % W_TILES) * BOX_W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(Cg, BLOCK_K)
    for t in range(0, R * S * c_blocks):
        rs = t // c_blocks
        c0 = (t - rs * c_blocks) * BLOCK_K
        r = rs // S
        s = rs - r * S
        a = x_desc.load([n0, oh0 + r * dil_h - pad_h, ow0 + s * dil_w - pad_w, c0]).reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([k0, rs * Cg + c0]).T
        acc = _mma(a, b, acc, False, INTERPRETED, False)
    if HAS_BIAS:
        offs_k = k0 + tl.arange(0, BLOCK_N)
        acc = acc + tl.load(bias_ptr + offs_k * stride_b, mask=offs_k < Kg, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc = acc + res_desc.load([n0, oh0, ow0, k0]).reshape(BLOCK_M, BLOCK_N).to(tl.float32)
    acc = tl.where(acc < 0, 0.0, acc)  # NaN passes, as in _fused_epilogue
    out = store_cast(acc, out_desc.dtype, INTERPRETED)
    out_desc.store([n0, oh0, ow0, k0], out.reshape(BOX_N, BOX_H, BOX_W, BLOCK_N))


@triton.jit
def _conv_depthwise_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    H, W, OH, OW, M, K, Kg, R, S,
    sxn, sxh, sxw,  # input strides; the channel stride is 1
    swk, swr, sws,  # weight (K, 1, R, S) strides
    stride_b,
    srn, srk, srh, srw,
    son, sok, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PADDED: tl.constexpr, ACC_F64: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One input channel per group: out[., k] = sum_rs x[., k // Kg] * w[k, rs], elementwise FMAs."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    k_ok = offs_k < K
    n, ih0, iw0 = _input_windows(offs_m, OH, OW, stride_h, stride_w, pad_h, pad_w)
    x_rows = x_ptr + (n.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw)
    cin = (offs_k // Kg).to(tl.int64)
    w_rows = w_ptr + offs_k.to(tl.int64) * swk
    if ACC_F64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(0, R * S):
        r = rs // S
        s = rs - r * S
        mask = m_ok[:, None] & k_ok[None, :]
        if PADDED:
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            mask = mask & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
        xv = tl.load(
            x_rows[:, None] + ((r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw) + cin[None, :],
            mask=mask, other=0.0,
        )
        wv = tl.load(w_rows + r * swr + s * sws, mask=k_ok, other=0.0)
        acc += xv.to(acc.dtype) * wv.to(acc.dtype)[None, :]
    _fused_epilogue(
        acc, offs_m, offs_k, M, K, OH, OW,
        bias_ptr, stride_b, res_ptr, srn, srk, srh, srw, out_ptr, son, sok, soh, sow,
        HAS_BIAS, HAS_RES, INTERPRETED,
    )


# ---------------------------------------------------------------------------------------
# Weight packing
# ---------------------------------------------------------------------------------------


def _weight_fits_kernel(w: torch.Tensor) -> bool:
    """Per output channel, (r, s, c) must be one flat run with c fastest (a channels_last weight)."""
    _, cg, r, s = w.shape
    return (cg == 1 or w.stride(1) == 1) and (s == 1 or w.stride(3) == cg) and (r == 1 or w.stride(2) == s * cg)


def kernel_layout_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the kernel's (K, R, S, C/groups) layout: channels_last weights (and 1x1
    weights) as they are, others as one channels_last copy per call.

    The copy is not cached across calls on purpose: a cache keyed by the weight's `_version`
    returns stale weights after writes through `.data` (gradcheck's perturbations, older
    training code), which do not bump the version. Keep weights channels_last
    (`model.to(memory_format=torch.channels_last)`) and no copy is made.
    """
    return weight if _weight_fits_kernel(weight) else _pack(weight)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return weight.detach().contiguous(memory_format=torch.channels_last)



# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def _pair(name: str, value) -> List[int]:
    value = list(value)
    if len(value) != 2 or not all(isinstance(v, (int, torch.SymInt)) for v in value):
        raise RuntimeError(f"expected {name} to be a list of 2 ints, but got {value}")
    return value


def _output_hw(h, w, kernel, stride, padding, dilation):
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // st + 1
        for size, k, st, p, d in zip((h, w), kernel, stride, padding, dilation)
    )


def _check_args(input, weight, residual, bias, stride, padding, dilation, groups):
    """Cheap checks in PyTorch's wording; the public front end validates more thoroughly."""
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if weight.dim() != 4:
        raise RuntimeError(f"weight should have 4 dimensions (K, C/groups, R, S), but got {weight.dim()}")
    if input.dim() != 4:
        raise RuntimeError(
            f"Expected 4-dimensional input for 4-dimensional weight {list(weight.shape)}, but got "
            f"{input.dim()}-dimensional input of size {list(input.shape)} instead"
        )
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if any(s <= 0 for s in stride):
        raise RuntimeError("non-positive stride is not supported")
    if any(p < 0 for p in padding):
        raise RuntimeError("negative padding is not supported")
    if any(d <= 0 for d in dilation):
        raise RuntimeError("dilation should be greater than zero")
    k_out, cg, r, s = weight.shape
    check_weight_sizes("conv2d (Triton)", weight, groups)
    if input.size(1) != cg * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(input.shape)} "
            f"to have {cg * groups} channels, but got {input.size(1)} channels instead"
        )
    if k_out % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {list(weight.shape)} instead"
        )
    check_image_sizes("conv2d (Triton)", input)
    padded = (input.size(2) + 2 * padding[0], input.size(3) + 2 * padding[1])
    span = (dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1)
    if padded[0] < span[0] or padded[1] < span[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). "
            f"Kernel size: ({span[0]} x {span[1]}). Kernel size can't be greater than actual input size"
        )
    if bias is not None and (bias.dim() != 1 or bias.numel() != k_out):
        raise RuntimeError(
            f"Given weight of size {list(weight.shape)}, expected bias to be 1-dimensional with {k_out} "
            f"elements, but got bias of size {list(bias.shape)} instead"
        )
    tensors = [("input", input), ("weight", weight), ("bias", bias), ("residual", residual)]
    for name, t in tensors[1:]:
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"Input type ({input.dtype}) and {name} type ({t.dtype}) should be the same")
        if t is not None and t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} and {t.device}!"
            )
    if input.dtype not in _runtime.SUPPORTED_DTYPES:
        raise RuntimeError(f"conv2d (Triton) does not support dtype {input.dtype}")
    out_hw = _output_hw(input.size(2), input.size(3), (r, s), stride, padding, dilation)
    out_shape = (input.size(0), k_out, *out_hw)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise RuntimeError(
            f"residual must have the output's shape {list(out_shape)}, but got {list(residual.shape)}"
        )
    return stride, padding, dilation, out_shape


def unsupported_reasons(input, weight, bias=None, residual=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """Why the Triton conv cannot run this case (empty list: it can). Arguments as in the op."""
    reasons = _runtime.device_reasons(
        _conv_gemm_kernel, (input, weight, bias, residual), ("input", "weight", "bias", "residual")
    )
    if input.dim() != 4 or weight.dim() != 4:
        reasons.append("input and weight must be 4-D (the front end unsqueezes unbatched input)")
    if len(list(padding)) != 2 or len(list(stride)) != 2 or len(list(dilation)) != 2:
        reasons.append("stride, padding and dilation must be 2 ints each (symmetric padding)")
    return reasons


# ---------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------

_gemm_tuner = _autotune.Tuner("conv2d_gemm.v3")  # v3: output-box configs; older picks never saw them
_depthwise_tuner = _autotune.Tuner("conv2d_depthwise")

_C = _autotune.Config
# First entry of each list is the untuned default. Fields: block m, n, k, group m, warps, stages
# (and tma: descriptor loads, see _tma_operands). Tiles whose fp32 accumulator needs more than 64
# registers per thread spill once the fused epilogue's addressing is added (checked in the
# SASS), so no tile exceeds 128x128 or 256x64 on 8 warps.
_HOPPER_16BIT = [  # wgmma: M multiple of 64 per warpgroup, K = 64 per stage
    _C(128, 128, 64, 8, 8, 3), _C(128, 128, 64, 8, 8, 4), _C(128, 128, 32, 8, 8, 5), _C(128, 64, 64, 8, 4, 4),
    _C(64, 128, 64, 8, 4, 4), _C(128, 64, 64, 8, 8, 4), _C(64, 64, 64, 8, 4, 4),
    _C(256, 64, 64, 8, 8, 3),  # for 64 output channels, unmeasured: two warpgroups of 128x64
    # TMA descriptors (weight, 1x1 input, residual and output tiles; see _tma_operands): unmeasured,
    # so only candidates (two, as every candidate costs a compile in the first call of each shape).
    _C(128, 128, 64, 8, 8, 3, True), _C(128, 64, 64, 8, 4, 4, True),
    # Output boxes, every operand through TMA (_conv_boxes_kernel: stride-1 convs), one program per
    # tile or, persistent, per SM (1x1 convs too): unmeasured too.
    _C(128, 128, 64, 8, 8, 3, True, True), _C(128, 64, 64, 8, 4, 4, True, True),
    _C(128, 128, 64, 8, 8, 3, True, True, True), _C(128, 64, 64, 8, 4, 4, True, True, True),
]
_OTHER_16BIT = [
    _C(128, 128, 32, 8, 8, 4), _C(128, 128, 64, 8, 8, 3), _C(128, 64, 32, 8, 4, 4), _C(64, 128, 32, 8, 4, 4),
    _C(64, 64, 32, 8, 4, 4), _C(64, 64, 64, 8, 4, 3),
]
_FP32 = [
    _C(128, 128, 32, 8, 8, 3), _C(128, 64, 32, 8, 4, 4), _C(64, 128, 32, 8, 4, 4), _C(64, 64, 32, 8, 4, 3),
]
_FP64 = [_C(32, 32, 8, 8, 4, 2)]
_INTERPRETER = _C(128, 64, 32, 8, 1, 1)  # big tiles: the interpreter pays per program and per op
_DEPTHWISE = [_C(64, 64, 0, 0, 4, 1), _C(32, 128, 0, 0, 4, 1), _C(128, 32, 0, 0, 4, 1), _C(16, 256, 0, 0, 4, 1)]
_DEPTHWISE_INTERPRETER = _C(128, 64, 0, 0, 1, 1)


def _gemm_candidates(dtype, device, rows, kg, reduction, interpreted):
    if interpreted:
        configs = [_INTERPRETER]
    elif dtype == torch.float64:
        configs = _FP64
    elif dtype == torch.float32:
        configs = _FP32
    else:
        configs = _HOPPER_16BIT if _autotune.is_hopper(device) else _OTHER_16BIT
    # Clamp tiles to the problem so tiny layers do not compute mostly padding; tl.dot needs >= 16.
    cap_m, cap_n, cap_k = (_autotune.pow2_at_least(v) for v in (rows, kg, reduction))
    if dtype == torch.float64:
        cap_k = _autotune.pow2_at_least(reduction, floor=8)
    clamped = []
    for c in configs:
        c = c._replace(block_m=min(c.block_m, cap_m), block_n=min(c.block_n, cap_n), block_k=min(c.block_k, cap_k))
        if c not in clamped:
            clamped.append(c)
    return clamped


class _Matrix(NamedTuple):
    """A tensor walked as a row-major (rows, cols) matrix with this row stride: a TMA descriptor's view."""
    rows: int
    cols: int
    row_stride: int


class _TmaOperands(NamedTuple):
    """One value per conv operand that TMA can move: from _tma_operands, the matrix its descriptor
    walks; for _launch_fn, its _Desc (None: it goes as a pointer)."""
    weight: Any = None
    input: Any = None
    residual: Any = None
    out: Any = None


class _Layout(NamedTuple):
    """What decides which operands of a conv call TMA can move: shapes, strides (the input's as the
    kernel sees it, the residual's None without one), geometry and dtype."""
    x_shape: tuple
    x_strides: tuple
    w_shape: tuple
    w_stride_k: int  # weight stride between output channels, as the kernel sees it
    out_shape: tuple
    out_strides: tuple
    res_strides: Optional[tuple]
    stride: tuple
    padding: tuple
    groups: int
    flat_k: bool
    dtype: torch.dtype


class _Desc(NamedTuple):
    """How a TMA tensor descriptor walks one operand: shape, strides (the last one 1) and box."""
    shape: tuple
    strides: tuple
    box: tuple


def _pointers_only(config):
    """The config's plain twin: the same tiles with pointer loads, no descriptors, boxes or persistence."""
    return config._replace(tma=False, boxes=False, persistent=False)


_MIN_BOX_USE = 0.75  # the share of a box tiling's rows that are real output pixels, at least


def _tma_stride(stride, itemsize) -> bool:
    """Whether a TMA descriptor can step along a dimension with this stride (in elements): it
    takes positive strides that are multiples of 16 bytes (no stride-0 broadcasts)."""
    return stride > 0 and stride * itemsize % 16 == 0


def _output_boxes(block_m, n, oh, ow):
    """(images, rows, columns): the box of output pixels, block_m in all, whose tiling of an
    (n, oh, ow) output wastes least at its edges, or None if the best wastes more than
    1 - _MIN_BOX_USE. Among equals, fewer images per box (less input halo), then squarer, then
    wider (longer runs of NHWC memory per box row)."""
    best, best_rank = None, None
    for log_w in range(block_m.bit_length()):
        for log_h in range(block_m.bit_length() - log_w):
            bw, bh = 1 << log_w, 1 << log_h
            bn = block_m // (bw * bh)
            if max(bn, bh, bw) > 256:  # TMA boxes are at most 256 per dimension
                continue
            use = 1.0
            for size, box in ((n, bn), (oh, bh), (ow, bw)):
                use *= size / (_runtime.cdiv(size, box) * box)
            rank = (use, bh * bw, -abs(log_h - log_w), log_w)
            if best_rank is None or rank > best_rank:
                best, best_rank = (bn, bh, bw), rank
    return best if best_rank[0] >= _MIN_BOX_USE else None


def _box_operands(config, layout: _Layout):
    """For _conv_boxes_kernel: ((images, rows, columns) per box, the (images, rows, columns) of
    output the boxes tile, _TmaOperands of _Desc), or None where it cannot run or has no point.
    It needs stride 1, groups 1, no FLAT_K, an NHWC input and residual and a channels_last output
    with 16-byte strides; a plain GEMM (1x1, unpadded) has _conv_gemm_kernel's X_DESC, so only its
    persistent config is new."""
    k_out, cg, r, s = layout.w_shape
    dtype, w_stride_k, res_strides = layout.dtype, layout.w_stride_k, layout.res_strides
    plain_gemm = r * s == 1 and layout.padding == (0, 0)
    if (not (config.tma and config.boxes) or layout.stride != (1, 1) or layout.groups != 1 or layout.flat_k
            or (plain_gemm and not config.persistent) or not _tma_stride(w_stride_k, dtype.itemsize)):
        return None

    def nhwc(shape, strides):  # (shape, strides) of the (N, H, W, C) view TMA walks, or None
        n, c, h, w = shape
        sn, sc, sh, sw = strides
        aligned = all(_tma_stride(v, dtype.itemsize) for v in (sn, sh, sw)) and max(shape) < 2**31
        return ((n, h, w, c), (sn, sh, sw, 1)) if sc == 1 and aligned else None

    def pixel_run(shape, strides):
        # One image of N*H*W pixels in a row (dense NHWC only): boxes are then runs of block_m
        # pixels, and the tile needs no reshape, so Triton feeds wgmma its input tile straight
        # from shared memory instead of through registers.
        m = _pixel_rows(shape, strides, dtype.itemsize)
        return None if m is None else ((1, 1, m.rows, m.cols), (m.rows * m.row_stride,) * 2 + (m.row_stride, 1))

    view = pixel_run if plain_gemm else nhwc
    x, out = view(layout.x_shape, layout.x_strides), view(layout.out_shape, layout.out_strides)
    res = view(layout.out_shape, res_strides) if res_strides is not None else None
    if x is None or out is None or (res_strides is not None and res is None):
        return None
    boxes = (1, 1, config.block_m) if plain_gemm else _output_boxes(config.block_m, *out[0][:3])
    if boxes is None:
        return None
    bn, bh, bw = boxes
    out_box = (bn, bh, bw, config.block_n)
    return boxes, out[0][:3], _TmaOperands(
        weight=_Desc((k_out, r * s * cg), (w_stride_k, 1), (config.block_n, config.block_k)),
        input=_Desc(*x, (bn, bh, bw, config.block_k)),
        residual=_Desc(*res, out_box) if res is not None else None,
        out=_Desc(*out, out_box))


def _pixel_rows(shape, strides, size) -> Optional[_Matrix]:
    """An NCHW-logical tensor stored NHWC-dense (channels_last, or channel slices of it) as the
    (N*H*W, C) matrix a descriptor can walk, or None. TMA wants 16-byte row strides and 32-bit
    coordinates."""
    n, c, h, w = shape
    sn, sc, sh, sw = strides
    # Pixel m = (i * h + y) * w + x must sit at m * row: each dimension of size above 1 needs
    # exactly its stride (a size-1 one's says nothing: an (N, C, 1, W) slice of a wider image
    # has sn = W' * C, not W * C).
    row = sw if w > 1 else sh if h > 1 else sn
    dense = ((c == 1 or sc == 1) and (w == 1 or sw == row) and (h == 1 or sh == w * row)
             and (n == 1 or sn == h * w * row))
    if not dense or not _tma_stride(row, size) or n * h * w >= 2**31:
        return None
    return _Matrix(n * h * w, c, row)


def _tma_operands(config, layout: _Layout) -> _TmaOperands:
    """The operands a config may pass as TMA descriptors, judged by the layouts (base-pointer
    alignment is checked per call). A descriptor zero-fills outside its matrix but not between
    the channel blocks of kernel taps (or, FLAT_K, of kernel rows) or of groups, and its stores
    are clipped only at the matrix's edges, hence the whole-block terms."""
    if not config.tma:
        return _TmaOperands()
    groups, flat_k, w_stride_k = layout.groups, layout.flat_k, layout.w_stride_k
    size = layout.dtype.itemsize
    k_out, cg, r, s = layout.w_shape
    kg = k_out // groups
    even_c = cg % config.block_k == 0
    whole_taps = (s * cg) % config.block_k == 0 or r == 1 if flat_k else even_c or r * s == 1
    weight = _Matrix(k_out, r * s * cg, w_stride_k) if whole_taps and _tma_stride(w_stride_k, size) else None
    plain_gemm = r == s == 1 and layout.stride == (1, 1) and layout.padding == (0, 0) and not flat_k
    inputs = _pixel_rows(layout.x_shape, layout.x_strides, size) if plain_gemm and (groups == 1 or even_c) else None
    whole_groups = groups == 1 or kg % config.block_n == 0
    out = _pixel_rows(layout.out_shape, layout.out_strides, size) if whole_groups else None
    residual = (_pixel_rows(layout.out_shape, layout.res_strides, size)
                if whole_groups and layout.res_strides is not None else None)
    return _TmaOperands(weight, inputs, residual, out)


def _depthwise_candidates(rows, k, interpreted):
    configs = [_DEPTHWISE_INTERPRETER] if interpreted else _DEPTHWISE
    cap_m, cap_n = _autotune.pow2_at_least(rows), _autotune.pow2_at_least(k)
    clamped = []
    for c in configs:
        c = c._replace(block_m=min(c.block_m, cap_m), block_n=min(c.block_n, cap_n))
        if c not in clamped:
            clamped.append(c)
    return clamped


class _Plan(NamedTuple):
    """Everything about a call that follows from its tensors' sizes, strides, dtypes and devices
    and its geometry: worked out (and tuned) once per such signature, reused by every call."""
    out_shape: tuple
    out_format: torch.memory_format
    copy_input: bool  # NCHW (or other) input: one channels_last copy per call
    pack_weight: bool
    launch: Optional[Callable]  # launch(x, weight, bias, residual, out); None: nothing to launch


_PLANS: dict = {}


def _plan_key(input, weight, residual, bias, stride, padding, dilation, groups):
    """The call's signature for _PLANS, or None where no plan may be kept: traced or fake tensors
    (torch.compile), meta tensors."""
    tensors = (input, weight, residual, bias)
    if any(t is not None and type(t) not in PLAIN_TENSORS for t in tensors) or input.device.type == "meta":
        return None
    tf32 = input.dtype == torch.float32 and _runtime.cudnn_conv_allows_tf32()
    return (tuple(stride), tuple(padding), tuple(dilation), groups, tf32) + tuple(
        None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors)


def _conv2d_fused(input, weight, residual, bias, stride, padding, dilation, groups):
    _runtime.refuse_forward_ad("conv2d (Triton)", input, weight, residual, bias)
    key = _plan_key(input, weight, residual, bias, stride, padding, dilation, groups)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _make_plan(input, weight, residual, bias, stride, padding, dilation, groups)
        if key is not None:
            remember(_PLANS, key, plan)
    out = torch.empty(plan.out_shape, dtype=input.dtype, device=input.device, memory_format=plan.out_format)
    if plan.launch is not None and _runtime.should_launch(_conv_gemm_kernel, input, weight, bias, residual):
        x = input.contiguous(memory_format=torch.channels_last) if plan.copy_input else input
        with _runtime.device_guard(x):
            plan.launch(x, _pack(weight) if plan.pack_weight else weight, bias, residual, out)
    return out


def _launch_fn(kernel_fn, grid, constants, descs=_TmaOperands(), plain_twin=None):
    """launch(x, weight, bias, residual, out, compile_only=False) for a kernel with its grid and
    non-tensor arguments fixed; compile_only compiles without launching (Triton's warmup). Unused
    pointer arguments get x (only ever read): HAS_BIAS / HAS_RES keep them untouched.

    Operands with a _Desc in `descs` go as TMA descriptors built per call, or, when one of their
    base pointers is not 16-byte aligned (sliced views), through the plain twin config's launch."""
    kernel = _runtime.launcher(kernel_fn)[grid]
    described = [(i, desc) for i, desc in enumerate(descs) if desc is not None]

    def launch(x, weight, bias, residual, out, compile_only=False):
        w_arg, x_arg, res_arg, out_arg = weight, x, residual, out
        if described:
            tensors = _TmaOperands(weight, x, residual, out)
            args = list(tensors)
            for i, desc in described:
                if tensors[i].data_ptr() % 16:
                    return plain_twin(x, weight, bias, residual, out, compile_only)
                args[i] = TensorDescriptor(tensors[i], list(desc.shape), list(desc.strides), list(desc.box))
            w_arg, x_arg, res_arg, out_arg = args
        args = (x_arg, w_arg, x if bias is None else bias, x if residual is None else res_arg, out_arg)
        if compile_only:
            kernel_fn.warmup(*args, grid=grid, **constants)
        else:
            kernel(*args, **constants)
    return launch


def _make_plan(input, weight, residual, bias, stride, padding, dilation, groups) -> _Plan:
    """Checks the call's arguments (raising as PyTorch does), picks the tile config (tuning it
    where allowed) and fixes the grid and every non-tensor kernel argument."""
    stride, padding, dilation, out_shape = _check_args(
        input, weight, residual, bias, stride, padding, dilation, groups
    )
    out_format = conv_output_memory_format(input, weight)
    # The kernels index channels with unit stride: NCHW (or other) input costs one copy per call.
    copy_input = not (input.size(1) == 1 or input.stride(1) == 1)
    depthwise = weight.size(1) == 1 and groups > 1  # its own kernel, which reads any weight strides
    pack_weight = not depthwise and not _weight_fits_kernel(weight)
    if any(v == 0 for v in out_shape):
        return _Plan(out_shape, out_format, copy_input, pack_weight, None)
    out_strides = torch.empty(out_shape, device="meta", memory_format=out_format).stride()
    # The strides the kernel will see: the input's, or its channels_last copy's (made per call).
    x_strides = (torch.empty(input.shape, device="meta", memory_format=torch.channels_last).stride() if copy_input
                 else input.stride())
    n_img, c_in, h, w_ = input.shape
    k_out, cg, r, s = weight.shape
    kg = k_out // groups
    _, _, oh, ow = out_shape
    rows = n_img * oh * ow
    interpreted = _runtime.is_interpreted(_conv_gemm_kernel)
    fake = any(_runtime.is_fake(t) for t in (input, weight, bias, residual) if t is not None)
    padded = padding[0] > 0 or padding[1] > 0
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    common = dict(
        H=h, W=w_, OH=oh, OW=ow, M=rows, R=r, S=s,
        sxn=x_strides[0], sxh=x_strides[2], sxw=x_strides[3],
        stride_b=bias.stride(0) if bias is not None else 0,
        srn=res_strides[0], srk=res_strides[1], srh=res_strides[2], srw=res_strides[3],
        son=out_strides[0], sok=out_strides[1], soh=out_strides[2], sow=out_strides[3],
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
        dil_h=dilation[0], dil_w=dilation[1],
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, PADDED=padded, INTERPRETED=interpreted,
    )
    hint = _runtime.hint  # sizes may be symbolic under torch.compile; tile choice uses example values
    shape_key = (
        str(input.dtype).replace("torch.", ""), *map(hint, (n_img, c_in, h, w_, k_out, r, s)),
        *map(hint, (*stride, *padding, *dilation, groups)), bias is not None, residual is not None,
        *map(hint, x_strides), *map(hint, out_strides),
    )

    if depthwise:
        def launch_with(config):
            grid = (_runtime.cdiv(rows, config.block_m), _runtime.cdiv(k_out, config.block_n))
            constants = dict(K=k_out, Kg=kg, swk=weight.stride(0), swr=weight.stride(2), sws=weight.stride(3),
                             ACC_F64=input.dtype == torch.float64, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                             num_warps=config.num_warps, num_stages=config.num_stages, **common)
            return _launch_fn(_conv_depthwise_kernel, grid, constants)

        candidates = _depthwise_candidates(hint(rows), hint(k_out), interpreted)
        tuner = _depthwise_tuner
    else:
        w_stride_k = r * s * cg if pack_weight else weight.stride(0)
        flat_k = cg < 16
        allow_tf32 = input.dtype == torch.float32 and not interpreted and _runtime.cudnn_conv_allows_tf32()

        layout = _Layout(tuple(input.shape), tuple(x_strides), tuple(weight.shape), w_stride_k, tuple(out_shape),
                         tuple(out_strides), tuple(res_strides) if residual is not None else None, tuple(stride),
                         tuple(padding), groups, flat_k, input.dtype)

        def launch_with(config):
            plain_twin = _pointers_only(config)
            boxed = _box_operands(config, layout)
            if boxed is not None:
                (bn, bh, bw), (images, out_h, out_w), descs = boxed
                h_tiles, w_tiles = _runtime.cdiv(out_h, bh), _runtime.cdiv(out_w, bw)
                tiles = _runtime.cdiv(images, bn) * h_tiles * w_tiles * _runtime.cdiv(kg, config.block_n)
                grid = (min(tiles, _runtime.program_slots(input.device)) if config.persistent else tiles,)
                shared = ("R", "S", "stride_b", "pad_h", "pad_w", "dil_h", "dil_w", "HAS_BIAS", "HAS_RES", "INTERPRETED")
                constants = dict(TILES=tiles, H_TILES=h_tiles, W_TILES=w_tiles, Cg=cg, Kg=kg, BOX_N=bn, BOX_H=bh,
                                 BOX_W=bw, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PERSISTENT=config.persistent,
                                 num_warps=config.num_warps, num_stages=config.num_stages,
                                 **{name: common[name] for name in shared})
                return _launch_fn(_conv_boxes_kernel, grid, constants, descs, launch_with(plain_twin))
            config = config._replace(boxes=False, persistent=False)
            grid = (groups * _runtime.cdiv(rows, config.block_m) * _runtime.cdiv(kg, config.block_n),)
            tma = _tma_operands(config, layout)
            constants = dict(Cg=cg, Kg=kg, swk=w_stride_k, FLAT_K=flat_k, EVEN_C=cg % config.block_k == 0,
                             FMA_F64=input.dtype == torch.float64, ALLOW_TF32=allow_tf32,
                             BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                             GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
                             W_DESC=tma.weight is not None, X_DESC=tma.input is not None,
                             R_DESC=tma.residual is not None, O_DESC=tma.out is not None, **common)
            if not any(tma):
                return _launch_fn(_conv_gemm_kernel, grid, constants)
            blocks = _TmaOperands(weight=(config.block_n, config.block_k), input=(config.block_m, config.block_k),
                                  residual=(config.block_m, config.block_n), out=(config.block_m, config.block_n))
            descs = _TmaOperands(*(None if m is None else _Desc((m.rows, m.cols), (m.row_stride, 1), block)
                                   for m, block in zip(tma, blocks)))
            return _launch_fn(_conv_gemm_kernel, grid, constants, descs, launch_with(plain_twin))

        reduction = s * cg if flat_k else cg  # per reduction step
        candidates = _gemm_candidates(input.dtype, input.device, hint(rows), hint(kg), hint(reduction), interpreted)
        # Descriptors cannot be traced (torch.compile's wrap_triton does not capture host TMA
        # descriptors), and a config whose descriptors are ineligible here is its plain twin.
        def eligible(c):  # the config as it would run here
            if fake:
                return _pointers_only(c)
            if c.boxes and _box_operands(c, layout) is None:
                c = c._replace(boxes=False, persistent=False)
            return c if c.boxes or any(_tma_operands(c, layout)) else c._replace(tma=False)

        candidates = list(dict.fromkeys(eligible(c) for c in candidates))
        tuner = _gemm_tuner
        # What decides which candidates may use TMA, beyond the shape and the input's and output's strides.
        shape_key = shape_key + (allow_tf32, hint(w_stride_k),
                                 *(map(hint, res_strides) if residual is not None else ()))

    if len(candidates) == 1:
        config = candidates[0]
    else:
        kernel_input = functools.cache(lambda: input.contiguous(memory_format=torch.channels_last) if copy_input
                                       else input)
        kernel_weight = functools.cache(lambda: _pack(weight) if pack_weight else weight)
        scratch = functools.cache(lambda: torch.empty(out_shape, dtype=input.dtype, device=input.device,
                                                      memory_format=out_format))

        def bench(cfg):  # on a scratch output: tuning never writes the real one
            launch = launch_with(cfg)
            with _runtime.device_guard(input):
                return _autotune.bench_ms(lambda: launch(kernel_input(), kernel_weight(), bias, residual, scratch()))

        def compile_only(cfg):
            with _runtime.device_guard(input):
                launch_with(cfg)(kernel_input(), kernel_weight(), bias, residual, scratch(), compile_only=True)

        config = tuner.pick(input.device, shape_key, candidates, bench, can_run=not fake, compile_only=compile_only)
    if fake:
        config = _pointers_only(config)  # a tuned TMA choice, while tracing
    return _Plan(out_shape, out_format, copy_input, pack_weight, launch_with(config))


@torch.library.triton_op("cnnkernels::conv2d_relu_triton", mutates_args=())
def conv2d_relu_triton(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """relu(conv2d(input, weight, bias)) in one Triton kernel."""
    return _conv2d_fused(input, weight, None, bias, stride, padding, dilation, groups)


@torch.library.triton_op("cnnkernels::conv2d_add_relu_triton", mutates_args=())
def conv2d_add_relu_triton(
    input: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> torch.Tensor:
    """relu(conv2d(input, weight, bias) + residual) in one Triton kernel."""
    return _conv2d_fused(input, weight, residual, bias, stride, padding, dilation, groups)
