"""cnnkernels: fused conv2d + bias + ReLU and residual-add + ReLU for PyTorch."""
from . import _compile_cache, _extension, _registration

if _extension.module() is not None:
    _registration.register_extension_ops()
_compile_cache.tag_compile_caches()

from . import models, nn
from .backends import available_backends, get_backend, set_backend, use_backend
from .functional import add_relu, conv2d_add_relu, conv2d_relu
from .fuse import fuse

__version__ = "0.1.0"
__all__ = ["conv2d_relu", "conv2d_add_relu", "add_relu", "nn", "models", "fuse", "set_backend", "get_backend",
           "use_backend", "available_backends"]
