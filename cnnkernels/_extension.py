"""Loads the C++ extension cnnkernels._C, never failing the import of cnnkernels.

`status()` says whether it loaded and, if not, why ("built for torch X, running Y", "not
built", ...). `require()` raises that reason as a RuntimeError where a C++ op is called.
"""
import importlib
import torch

_module = None
_problem = None

# The C++ ops this Python code calls (their schemas are in csrc/ops.cpp), and the module's
# direct entry points to them.
REQUIRED_OPS = ("conv2d_relu", "conv2d_add_relu", "add_relu", "relu_backward_bias_grad")
ENTRY_POINTS = ("conv2d_relu", "conv2d_add_relu", "add_relu")


def missing_ops(names=REQUIRED_OPS):
    """The ops of `names` that no loaded library defines under cnnkernels::."""
    missing = []
    for name in names:
        try:
            getattr(torch.ops.cnnkernels, name)
        except (AttributeError, RuntimeError):
            missing.append(name)
    return missing


def _load():
    global _module, _problem
    try:
        from . import _build_info
    except ImportError:
        _problem = ("the C++ extension cnnkernels._C is not built; install with "
                    "`pip install --no-build-isolation -e .`")
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        # A .so built against another torch can load and then crash: never load it.
        _problem = (f"the C++ extension cnnkernels._C was built for torch {_build_info.TORCH_VERSION}, "
                    f"running torch {torch.__version__}; rebuild it with "
                    "`pip install --no-build-isolation -e .`")
        return
    try:
        module = importlib.import_module("cnnkernels._C")
    except ImportError as error:
        _problem = f"the C++ extension cnnkernels._C failed to load: {error}"
        return
    missing = ([f"cnnkernels::{name}" for name in missing_ops()]
               + [f"cnnkernels._C.{name}" for name in ENTRY_POINTS if not hasattr(module, name)])
    if missing:  # a build older than this Python code
        _problem = (f"the C++ extension cnnkernels._C is out of date: it lacks {', '.join(missing)}; "
                    "rebuild it with `pip install --no-build-isolation -e .`")
        return
    _module = module


_load()


def module():
    """The loaded extension module, or None."""
    return _module


def problem():
    """Why the extension is unusable, or None when it loaded."""
    return _problem


def require():
    if _module is None:
        raise RuntimeError(f"cnnkernels: {_problem}")
    return _module


def has_cuda_kernels():
    return _module is not None and any(k.startswith("cuda:") for k in _module.kernels)
