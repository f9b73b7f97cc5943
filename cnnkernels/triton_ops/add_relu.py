"""relu(input + other) in one pass over memory, as a Triton kernel."""

import torch
import triton
import triton.language as tl

from .._args import empty_add_relu_output, laid_out_as
from . import _runtime
from ._runtime import store_cast

_BLOCK = 4096  # 16 elements per thread at 8 warps: 16-byte vector loads for every dtype
_NUM_WARPS = 8


@triton.jit
def _add_relu_kernel(a_ptr, b_ptr, out_ptr, numel, BLOCK: tl.constexpr, F64: tl.constexpr, INTERPRETED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask)
    b = tl.load(b_ptr + offs, mask=mask)
    if F64:
        total = a + b
    else:
        total = a.to(tl.float32) + b.to(tl.float32)
    total = tl.where(total < 0, 0.0, total)  # NaN passes through, like torch.relu
    tl.store(out_ptr + offs, store_cast(total, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def add_relu_unsupported_reasons(input, other):
    """Why the Triton add_relu cannot run this case (empty list: it can)."""
    reasons = _runtime.device_reasons(_add_relu_kernel, (input, other), ("input", "other"))
    if input.shape != other.shape:
        reasons.append(
            f"input and other must have the same shape (no broadcasting), got {list(input.shape)} and {list(other.shape)}"
        )
    return reasons


@torch.library.triton_op("cnnkernels::add_relu_triton", mutates_args=())
def add_relu_triton(input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """relu(input + other), laid out as torch lays it out. `other` may alias `input`."""
    _runtime.refuse_forward_ad("add_relu (Triton)", input, other)
    if input.shape != other.shape:
        raise RuntimeError(
            f"add_relu (Triton): input and other must have the same shape, got {list(input.shape)} and {list(other.shape)}"
        )
    if input.dtype != other.dtype:
        raise RuntimeError(f"add_relu (Triton): input ({input.dtype}) and other ({other.dtype}) must have the same dtype")
    if input.device != other.device:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{input.device} and {other.device}!"
        )
    if input.dtype not in _runtime.SUPPORTED_DTYPES:
        raise RuntimeError(f"add_relu (Triton) does not support dtype {input.dtype}")

    # Both operands laid out as the output lets one flat pass follow storage order.
    out = empty_add_relu_output(input, other)
    a, b = laid_out_as(input, out), laid_out_as(other, out)
    numel = out.numel()
    if numel == 0 or not _runtime.should_launch(_add_relu_kernel, a, b):
        return out
    with _runtime.device_guard(a):
        _runtime.launcher(_add_relu_kernel)[(_runtime.cdiv(numel, _BLOCK),)](
            a, b, out, numel, BLOCK=_BLOCK, F64=a.dtype == torch.float64,
            INTERPRETED=_runtime.is_interpreted(_add_relu_kernel), num_warps=_NUM_WARPS
        )
    return out
