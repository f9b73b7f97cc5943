"""Whole models, in eval mode with BatchNorm folded for every contender.

  ours (triton, cuda, auto)  the cnnkernels.models zoo model itself: in eval mode it folds each BN
                             into its conv and runs conv2d_relu / conv2d_add_relu
  cudnn / eager              the same model traced with torch.fx in the zoo's reference mode (plain
                             PyTorch modules, exactly as torchvision runs them), BN folded by
                             torch.fx.experimental.optimization.fuse
  compile(_max_autotune)     torch.compile of that plain model
cuDNN's and oneDNN's fused ops have no model-level form, so they are not model contenders.
"""
import copy
import functools
import importlib

import torch

from .common import MAX_AUTOTUNE, Unavailable
from .contenders import backend_problem, compiled
from .shapes import MODEL_INPUTS


@functools.lru_cache(maxsize=None)
def _zoo_template(name):
    try:
        zoo = importlib.import_module("cnnkernels.models")
    except ImportError as error:
        raise Unavailable(f"cnnkernels.models cannot be imported: {error}") from None
    ctor = getattr(zoo, name, None)
    if ctor is None:
        raise Unavailable(f"cnnkernels.models has no {name}()")
    torch.manual_seed(0)
    return ctor().eval()


def zoo_model(name):
    """A fresh copy of model `name` of the zoo, the same random weights for every contender."""
    return copy.deepcopy(_zoo_template(name))


def plain_pytorch(model):
    """`model` as plain PyTorch modules with BN folded into the convs."""
    from torch.fx.experimental.optimization import fuse as fold_bn
    from cnnkernels.models import reference_mode
    with reference_mode():
        traced = torch.fx.symbolic_trace(model)
    return fold_bn(traced)


def model_function(contender, name, device, dtype):
    """fn(x) running model `name` for `contender`, on `device` in `dtype` and channels_last."""
    model = zoo_model(name)
    if contender in ("cudnn", "eager", "compile", MAX_AUTOTUNE):
        model = plain_pytorch(model)
    elif contender in ("cudnn_fused", "onednn"):
        raise Unavailable(f"{contender} has no model-level form")
    else:
        problem = backend_problem(contender, device)
        if problem:
            raise Unavailable(problem)
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    if contender in ("compile", MAX_AUTOTUNE):
        model = compiled(model, contender)

    if contender in ("cudnn", "eager", "compile", MAX_AUTOTUNE):
        def run(x):
            with torch.no_grad():
                return model(x)
        return run

    import cnnkernels

    def run_ours(x):
        with torch.no_grad(), cnnkernels.use_backend(contender):
            return model(x)
    return run_ours


def model_inputs(name, batch, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty((batch, *MODEL_INPUTS[name]), device=device, dtype=dtype, memory_format=torch.channels_last)
    return (x.normal_(generator=gen),)
