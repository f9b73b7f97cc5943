"""What every zoo model is built from: conv [→ BN] [→ + residual] [→ ReLU], run the cheapest exact way.

Train mode keeps BatchNorm's arithmetic (batch statistics, running-stat updates) and fuses what
it can: conv2d_relu where no BN sits between conv and ReLU, add_relu at a residual block's end,
and under the "triton" backend BN + (residual +) ReLU in one kernel pair (cnnkernels/batch_norm.py).
Eval mode folds each BN into its conv, so every unit becomes one conv2d_relu, conv2d_add_relu or
plain conv call. reference_mode() runs the models module by module with plain PyTorch ops, exactly
as torchvision's do; summary() and fuse() trace the models that way.
"""
import contextlib
import contextvars
import os
import weakref
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnkernels
from .. import _extension, batch_norm
from ..functional import _autocast_dtype, _cast
from ..fuse import fold_conv_bn

_REFERENCE = contextvars.ContextVar("cnnkernels_models_reference", default=False)


def _cpu_convs_in_fp32():
    """The 16-bit dtypes whose CPU convs the C++ ops compute in fp32 on this CPU: PyTorch's oneDNN
    lacks them here, and F.conv2d's fallback for them (ATen's own kernel) runs 8-40x slower than
    fp32 (bf16 on AVX2-only CPUs, fp16 on most). None without a (current) extension."""
    runs_in_fp32 = getattr(_extension.module(), "cpu_conv_runs_in_fp32", None)
    if runs_in_fp32 is None:
        return frozenset()
    return frozenset(dtype for dtype in (torch.bfloat16, torch.float16) if runs_in_fp32(torch.empty(0, dtype=dtype)))


_CPU_CONVS_IN_FP32 = _cpu_convs_in_fp32()  # a constant, so torch.compile traces no call


def _plain_conv(x, weight, bias, *args):
    """F.conv2d, computed in fp32 and rounded once where the C++ ops would do so (above).

    Under autocast the operands are first rounded to autocast's dtype, as F.conv2d's are there,
    and the fp32 conv runs with autocast off (which would otherwise send it back to that dtype).
    """
    if _CPU_CONVS_IN_FP32 and x.device.type == "cpu":
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x, weight, bias = _cast(dtype, x, weight, bias)
        if x.dtype in _CPU_CONVS_IN_FP32 and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
            with torch.autocast("cpu", enabled=False):
                bias = None if bias is None else bias.float()
                return F.conv2d(x.float(), weight.float(), bias, *args).to(x.dtype)
    return F.conv2d(x, weight, bias, *args)


@contextlib.contextmanager
def reference_mode():
    """Run cnnkernels.models module by module with unfused PyTorch ops, exactly as torchvision does.

    Inside it every Conv2d, BatchNorm2d and ReLU module is called, so forward hooks on them fire and
    torch.fx can trace the models. Outside it, and inside torch.compile, the models call the fused
    ops and skip those modules.
    """
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def _in_reference_mode():
    """Whether reference_mode() is on; never inside torch.compile, whose graphs take the fused ops
    (torch 2.11's Dynamo cannot trace ContextVar.get: a graph break at every unit)."""
    return not torch.compiler.is_compiling() and _REFERENCE.get()


# conv module -> (key, (weight, bias)): folded parameters, reused while the key still matches.
_FOLDED = weakref.WeakKeyDictionary()


def _fold_key(conv, bn):
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
    # data_ptr catches replaced tensors (.to(), load_state_dict(assign=True)); _version catches
    # in-place writes (copy_, load_state_dict, foreach optimizers). Train-mode BN updates its
    # running statistics without bumping their versions, but it does bump num_batches_tracked's.
    return (id(bn), bn.eps, torch.is_inference_mode_enabled()) + tuple(
        None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)


def folded_conv_bn(conv, bn):
    """conv's (weight, bias) with the eval-mode bn folded in; cached while no input tensor changes.

    With autograd recording (grad enabled and a parameter requiring grad) the fold is recomputed
    as part of the graph, so gradients reach the conv and BN parameters as they do in torchvision;
    the cached fold is then dropped too, as an optimizer step may follow (fused optimizers write
    parameters without bumping their version counters).
    """
    def fold():
        return fold_conv_bn(conv.weight, conv.bias, bn)

    params = (conv.weight, conv.bias, bn.weight, bn.bias)
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)):
        _FOLDED.pop(conv, None)
        return fold()
    try:
        key = _fold_key(conv, bn)
    except RuntimeError:  # inference tensors have no version counter: nothing safe to cache on
        return fold()
    entry = _FOLDED.get(conv)
    if entry is None or entry[0] != key:
        entry = (key, fold())
        _FOLDED[conv] = entry
    return entry[1]


class DropsFoldsOnModeSwitch:
    """Mixin for the modules that own conv units: train() and eval() drop their convs' cached folds."""

    def train(self, mode=True):
        for child in self.children():
            _FOLDED.pop(child, None)
        return super().train(mode)


def _bn_uses_running_stats(bn):
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


def conv_unit(x, conv, bn=None, relu=None, residual=None):
    """relu(bn(conv(x)) + residual), each part optional; `relu` is the block's nn.ReLU or None.

    Exactly torchvision's arithmetic in every mode; only the rounding differs where BN is folded.
    """
    if _in_reference_mode():
        y = conv(x)
        if bn is not None:
            y = bn(y)
        if residual is not None:
            y = y + residual
        return relu(y) if relu is not None else y

    if bn is not None and not _bn_uses_running_stats(bn):
        y = conv(x) if conv.padding_mode != "zeros" else _plain_conv(
            x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if relu is not None and batch_norm.runs_fused(y, bn, residual):
            return batch_norm.batch_norm_relu_train(y, bn, residual)
        y = bn(y)
        if residual is not None:
            return cnnkernels.add_relu(y, residual) if relu is not None else y + residual
        return relu(y) if relu is not None else y

    weight, bias = folded_conv_bn(conv, bn) if bn is not None else (conv.weight, conv.bias)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if relu is None:
        y = _plain_conv(x, weight, bias, *args)
        return y if residual is None else y + residual
    if residual is None:
        return cnnkernels.conv2d_relu(x, weight, bias, *args)
    return cnnkernels.conv2d_add_relu(x, weight, residual, bias, *args)


class ConvSequential(DropsFoldsOnModeSwitch, nn.Sequential):
    """nn.Sequential that runs each Conv2d [→ BatchNorm2d] [→ ReLU] run of its layers as one unit.

    Same children, state_dict and printout as the nn.Sequential it replaces; only forward differs.
    """

    def forward(self, x):
        if _in_reference_mode():
            return super().forward(x)
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            layer = layers[i]
            i += 1
            if type(layer) is not nn.Conv2d or layer.padding_mode != "zeros":
                x = layer(x)
                continue
            bn = relu = None
            if i < len(layers) and type(layers[i]) is nn.BatchNorm2d:
                bn, i = layers[i], i + 1
            if i < len(layers) and type(layers[i]) is nn.ReLU:
                relu, i = layers[i], i + 1
            x = conv_unit(x, layer, bn, relu)
        return x


def num_classes_of(weights, kwargs):
    """For a torchvision weights enum, set num_classes from its categories as torchvision does."""
    categories = getattr(weights, "meta", {}).get("categories") if weights is not None else None
    if categories is not None:
        given = kwargs.setdefault("num_classes", len(categories))
        if given != len(categories):
            raise ValueError(f"The parameter 'num_classes' expected value {len(categories)} but got {given} instead.")
    return kwargs


def load_weights(model, weights, progress=True):
    """Load `weights` strictly: a state_dict, a path to a saved state_dict, or a torchvision weights enum.

    Nothing is downloaded unless a torchvision weights enum is given (it fetches its own file).
    """
    if weights is None:
        return model
    if isinstance(weights, Mapping):
        state = weights
    elif isinstance(weights, (str, os.PathLike)):
        state = torch.load(weights, map_location="cpu", weights_only=True)
    elif hasattr(weights, "get_state_dict"):
        state = weights.get_state_dict(progress=progress, check_hash=True)
    else:
        raise TypeError("weights must be None, a state_dict, a path to a saved state_dict or a torchvision "
                        f"weights enum, but got {type(weights).__name__}")
    model.load_state_dict(state)
    return model
