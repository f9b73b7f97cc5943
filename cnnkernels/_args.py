"""Argument normalization and validation for the public functions.

Every backend receives the same normalized call: 4-D input, explicit symmetric padding, and
2-tuples for stride, padding and dilation. Messages follow PyTorch's wording.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch._prims_common
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F


@dataclass
class ConvCall:
    input: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    stride: List[int]
    padding: List[int]
    dilation: List[int]
    groups: int
    unbatched: bool

    @property
    def op_args(self):
        """Positional arguments of torch.ops.cnnkernels.conv2d_(add_)relu after input and weight."""
        return (self.stride, self.padding, self.dilation, self.groups)


def _pair(name, value):
    kind = type(value)
    if kind is int:
        return [value, value]
    if kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return list(value)  # the common forms first: this runs on every call
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of 2 ints, but got {value!r}")
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, torch.SymInt):
        return [value, value]
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)
                                      for v in value):
            raise RuntimeError(f"expected {name} to be a single integer value or a list of 2 values to "
                               f"match the convolution dimensions, but got {name}={list(value)}")
        return list(value)
    raise TypeError(f"{name} must be an int or a tuple of 2 ints, but got {type(value).__name__}")


def _check_tensor(op, name, value, required=True):
    if value is None and not required:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}(): argument '{name}' must be Tensor, not {type(value).__name__}")


def _check_same_kind(op, name, tensor, input):
    if tensor.dtype is input.dtype and tensor.device == input.device:
        return
    if tensor.device != input.device:
        raise RuntimeError(f"{op}: expected all tensors to be on the same device, but {name} is on "
                           f"{tensor.device} and input is on {input.device}")
    if tensor.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected {name} to have the same dtype as input ({input.dtype}), "
                           f"but got {tensor.dtype}")


def check_weight_sizes(op, weight, groups):
    """Refuses an empty weight in PyTorch's wording. F.conv2d refuses no output channels and an
    empty kernel; with no input channels it returns an output of 0 channels, not out_channels,
    so that is refused too rather than copied."""
    k, c_per_group, r, s = weight.shape
    if k < groups:
        raise RuntimeError(f"{op}: given groups={groups}, expected weight to be at least {groups} at dimension 0, "
                           f"but got weight of size {list(weight.shape)} instead")
    if r <= 0 or s <= 0:
        raise RuntimeError(f"{op}: kernel size should be greater than zero, but got kernel_height: {r} "
                           f"kernel_width: {s}")
    if c_per_group <= 0:
        raise RuntimeError(f"{op}: expected weight to be at least 1 at dimension 1 (input channels per group), "
                           f"but got weight of size {list(weight.shape)} instead")


def check_image_sizes(op, input):
    """Refuses a nonempty batch of empty images in PyTorch's wording, as F.conv2d does (an empty
    batch, even of empty images, it takes)."""
    n, c, h, w = input.shape
    if n != 0 and c != 0 and (h == 0 or w == 0):
        raise RuntimeError(f"{op}: only zero batch or zero channel inputs are supported, but got input shape: "
                           f"{list(input.shape)}")


def conv_call(op, input, weight, bias, stride, padding, dilation, groups, residual=None, needs_residual=False):
    """Validates a conv2d_relu / conv2d_add_relu call and returns it normalized. (It runs on every
    call: the common, valid case takes the fewest steps.)"""
    Tensor = torch.Tensor
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
            and (not needs_residual or isinstance(residual, Tensor))):
        _check_tensor(op, "input", input)
        _check_tensor(op, "weight", weight)
        _check_tensor(op, "bias", bias, required=False)
        if needs_residual:
            _check_tensor(op, "residual", residual)
    input_dim = input.dim()
    if input_dim != 4 and input_dim != 3:
        raise RuntimeError(f"{op}: expected 3D (unbatched) or 4D (batched) input, but got input of size: "
                           f"{list(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"{op}: expected 4D weight (out_channels, in_channels/groups, kH, kW), but got "
                           f"weight of size {list(weight.shape)}")
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"{op}: expected a floating-point input, but got {input.dtype}")
    _check_same_kind(op, "weight", weight, input)
    if type(groups) is not int and (not isinstance(groups, int) or isinstance(groups, bool)):
        raise TypeError(f"groups must be an int, but got {type(groups).__name__}")
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported, got groups={groups}")
    stride, dilation = _pair("stride", stride), _pair("dilation", dilation)
    if stride[0] <= 0 or stride[1] <= 0:
        raise RuntimeError(f"{op}: non-positive stride is not supported, got stride={stride}")
    if dilation[0] <= 0 or dilation[1] <= 0:
        raise RuntimeError(f"{op}: dilation should be greater than zero, got dilation={dilation}")

    unbatched = input_dim == 3
    if unbatched:
        input = input.unsqueeze(0)
        if residual is not None and isinstance(residual, torch.Tensor) and residual.dim() == 3:
            residual = residual.unsqueeze(0)
    n, c, h, w = input.shape
    k, c_per_group, r, s = weight.shape
    check_weight_sizes(op, weight, groups)
    if k % groups != 0:
        raise RuntimeError(f"{op}: given groups={groups}, expected weight to be divisible by {groups} at "
                           f"dimension 0, but got weight of size {list(weight.shape)} instead")
    if c != c_per_group * groups:
        raise RuntimeError(f"{op}: given groups={groups}, weight of size {list(weight.shape)}, expected "
                           f"input{list(input.shape)} to have {c_per_group * groups} channels, but got {c} "
                           "channels instead")
    check_image_sizes(op, input)
    if bias is not None:
        _check_same_kind(op, "bias", bias, input)
        if bias.dim() != 1 or bias.shape[0] != k:
            raise RuntimeError(f"{op}: given weight of size {list(weight.shape)}, expected bias to be "
                               f"1-dimensional with {k} elements, but got bias of size {list(bias.shape)} "
                               "instead")

    spans = [dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1]
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            if any(st != 1 for st in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            totals = [spans[0] - 1, spans[1] - 1]
            padding = [totals[0] // 2, totals[1] // 2]
            extra_h, extra_w = totals[0] % 2, totals[1] % 2
            if extra_h or extra_w:
                # Even kernels need one more row/column at the end, as F.conv2d adds.
                input = F.pad(input, [0, extra_w, 0, extra_h])
                h, w = h + extra_h, w + extra_w
        else:
            raise ValueError(f"Invalid padding string '{padding}', should be one of {{'valid', 'same'}}")
    else:
        padding = _pair("padding", padding)
        if padding[0] < 0 or padding[1] < 0:
            raise RuntimeError(f"{op}: negative padding is not supported, got padding={padding}")

    padded = [h + 2 * padding[0], w + 2 * padding[1]]
    if padded[0] < spans[0] or padded[1] < spans[1]:
        raise RuntimeError(f"{op}: calculated padded input size per channel: ({padded[0]} x {padded[1]}). "
                           f"Kernel size: ({spans[0]} x {spans[1]}). Kernel size can't be greater than "
                           "actual input size")
    if needs_residual:
        out_shape = [n, k, (padded[0] - spans[0]) // stride[0] + 1, (padded[1] - spans[1]) // stride[1] + 1]
        _check_same_kind(op, "residual", residual, input)
        if list(residual.shape) != out_shape:
            shown = out_shape[1:] if unbatched else out_shape
            got = list(residual.shape)[1:] if unbatched and residual.dim() == 4 else list(residual.shape)
            raise RuntimeError(f"{op}: expected residual of size {shown} (the convolution's output), but "
                               f"got residual of size {got}")
    # Dilation along a kernel dimension of size 1 changes nothing, and oneDNN (F.conv2d on the CPU,
    # torch 2.14.1) read out of bounds and crashed with it on channels_last tensors of width or
    # height 1-2. conv_args.h's effective_dilation does the same for the C++ ops.
    if (r == 1 and dilation[0] != 1) or (s == 1 and dilation[1] != 1):
        dilation = [1 if r == 1 else dilation[0], 1 if s == 1 else dilation[1]]
    return ConvCall(input, weight, bias, residual, stride, padding, dilation, groups, unbatched)


def check_add_relu(input, other):
    _check_tensor("add_relu", "input", input)
    _check_tensor("add_relu", "other", other)
    if not input.dtype.is_floating_point:
        raise RuntimeError(f"add_relu: expected a floating-point input, but got {input.dtype}")
    _check_same_kind("add_relu", "other", other, input)
    if other.shape != input.shape:
        raise RuntimeError(f"add_relu: expected other of size {list(input.shape)} to match input, but got "
                           f"other of size {list(other.shape)}")


def unsupported_differentiation(*tensors):
    """What our kernels (the cuda and triton backends) cannot differentiate in this call: they have
    backward formulas only. torch.func's transforms (grad, vmap, jvp, ...) refuse the C++ autograd
    function and the Triton ops' rules, and forward-mode AD would drop a dual tensor's tangent."""
    if torch.compiler.is_compiling():
        return []
    if torch._C._are_functorch_transforms_active():
        return ["torch.func transforms (grad, vmap, jvp, ...): the op has no functorch rules"]
    return [FORWARD_AD_UNSUPPORTED] if has_tangent(*tensors) else []


FORWARD_AD_UNSUPPORTED = "forward-mode AD (a dual tensor's tangent): the op has no jvp formula"


def layout_reasons(tensors, names):
    """What our kernels (the cuda and triton backends) cannot take in these tensors' layouts: they
    need dense (strided) tensors, not sparse or mkldnn ones."""
    return [f"{name} has layout {t.layout}; only dense (strided) tensors are supported"
            for t, name in zip(tensors, names) if t is not None and t.layout != torch.strided]


def has_tangent(*tensors):
    """Whether a forward-mode AD level is open and one of the tensors carries a tangent there."""
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # not fake, functional or other subclasses


def plain_eager(*args):
    """Whether a call with these arguments (tensors and others) is plain eager work, which needs
    neither torch.compile's tracing nor __torch_function__ (tensor subclasses, torch function
    modes), nor differentiation that our kernels lack (unsupported_differentiation): what lets
    backends.ExtensionBackend skip torch.ops' Python layer, and what triton_ops._runtime.call_op,
    which skips the dispatcher as well, asks first."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0):
        return False
    for a in args:  # a loop, not all(...): this runs on every call of the cuda backend
        if a is not None and type(a) not in PLAIN_TENSORS and isinstance(a, torch.Tensor):
            return False
    return True


MAX_CACHED = 4096  # entries per cache of ours; many distinct shapes (dynamic sizes) start it over


def remember(cache: dict, key, value):
    """cache[key] = value, in a cache of at most MAX_CACHED entries; returns value."""
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[key] = value
    return value


def shape_cached(cache: dict, t, make):
    """make(t), remembered in `cache` per (layout, shape, strides) of t: for what follows from those
    alone. Symbolic sizes (torch.compile tracing) are not hashable and skip the cache."""
    try:
        key = (t.layout, t.shape, t.stride())
        value = cache.get(key)
    except TypeError:
        return make(t)
    if value is None:
        value = remember(cache, key, make(t))
    return value


def empty_add_relu_output(input, other):
    """An empty tensor laid out as torch lays out relu(input + other); the C++ ops follow the same
    rule (csrc/conv_args.cpp, which says why it takes these steps)."""
    fmt = _common_format(input, other)
    if fmt is None:
        total = _on_meta(input) + _on_meta(other)
        fmt = _common_format(total)
        if fmt is None:
            return torch.empty_strided(input.shape, total.stride(), dtype=input.dtype, device=input.device)
    return torch.empty_like(input, memory_format=fmt)  # torch.empty with the same arguments costs 2-3 us more


def _common_format(*tensors):
    """Contiguous or channels_last, whichever all of `tensors` are (contiguous first), if any."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        if all(t.is_contiguous(memory_format=fmt) for t in tensors):
            return fmt
    return None


def _on_meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def laid_out_as(operand, output):
    """`operand` laid out like the dense `output`: itself where its elements already sit where the
    output's do, otherwise one copy."""
    if all(n == 1 or a == b for n, a, b in zip(output.shape, operand.stride(), output.stride())):
        return operand
    return torch.empty_like(output).copy_(operand)


_FORMATS = {}  # suggest_memory_format costs ~10 us a call


def memory_format_of(t):
    """t's memory format, as torch suggests it (suggest_memory_format)."""
    if torch.compiler.is_compiling():  # dynamo would specialize on the sizes in the cache's key
        return torch._prims_common.suggest_memory_format(t)
    return shape_cached(_FORMATS, t, torch._prims_common.suggest_memory_format)


def conv_output_memory_format(input, weight):
    """The memory format of a conv's output, as F.conv2d gives it: channels_last when the input or
    the weight is, contiguous otherwise, and contiguous for an empty batch (ATen's empty-input
    path). The C++ ops follow the same rule (csrc/conv_args.h)."""
    cl = torch.channels_last
    if input.numel() == 0:
        return torch.contiguous_format
    return cl if cl in (memory_format_of(input), memory_format_of(weight)) else torch.contiguous_format
