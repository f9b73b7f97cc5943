"""relu(bn(x) (+ residual)) for a BatchNorm2d in training mode, fused into two passes over memory
by the Triton kernels of triton_ops/batch_norm.py when the "triton" backend is chosen, and run
as PyTorch runs it otherwise.

The zoo models call it for each conv -> BN -> ReLU unit in train mode (models/_layers.py). It is
not in "auto": on the first GPU run (an H200) the ResNet-50 training step under "triton" took 4x
eager's time, not yet explained (README, Performance). Running statistics and
num_batches_tracked are updated exactly as nn.BatchNorm2d.forward updates them.
"""
import torch
import torch.nn as nn

from . import backends
from ._args import unsupported_differentiation

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_unsupported(x, bn, residual):
    """Why the fused kernels cannot run this call (empty: they can)."""
    reasons = []
    if type(bn) is not nn.BatchNorm2d or not bn.training or not bn.affine:
        reasons.append("only a training-mode, affine nn.BatchNorm2d is fused")
    if x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES or x.numel() == 0:
        reasons.append(f"input must be a non-empty 4-D float tensor, got {x.dtype} of size {list(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        reasons.append("residual must match the input's shape and dtype")
    return reasons + unsupported_differentiation(x, bn.weight, bn.bias, residual)


def runs_fused(x, bn, residual):
    """Whether batch_norm_relu_train takes the fused path for this call: the "triton" backend is
    chosen and can run on x's device."""
    return (backends.get_backend() == "triton" and backends.why_unavailable("triton", x.device) is None
            and not fused_unsupported(x, bn, residual))


def _momentum_factor(bn):
    """nn.BatchNorm2d.forward's update factor, counting this batch in num_batches_tracked."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def batch_norm_relu_train(x, bn, residual=None):
    """relu(bn(x) + residual) with bn in training mode (batch statistics)."""
    if not runs_fused(x, bn, residual):
        y = bn(x)
        return torch.relu(y if residual is None else y + residual)
    from .triton_ops import batch_norm as triton_batch_norm

    factor = _momentum_factor(bn)
    tracks = bn.track_running_stats and bn.running_mean is not None
    return triton_batch_norm.batch_norm_relu_train(x, bn.weight, bn.bias, residual, bn.eps,
                                                   bn.running_mean if tracks else None,
                                                   bn.running_var if tracks else None, factor)
