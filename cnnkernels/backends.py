"""Backend choice: which implementation runs a call.

  "torch"   the plain PyTorch reference (cnnkernels/reference.py)
  "cuda"    the C++ extension: torch.ops.cnnkernels.* (csrc/cpu on CPU tensors, csrc/cuda on GPU)
  "triton"  the Triton kernels: torch.ops.cnnkernels.*_triton (cnnkernels/triton_ops); on CPU
            tensors only through Triton's interpreter (TRITON_INTERPRET=1 before import)
  "auto"    the fastest backend verified on the tensors' device (AUTO_ORDER), falling back to
            "torch" for anything the others do not support

The choice is process-wide: set_backend(), the use_backend() context manager, or the
environment variable CNNKERNELS_BACKEND read at import.
"""
import contextlib
import os

import torch

from . import _extension, auto_choice, reference
from ._args import layout_reasons, plain_eager, unsupported_differentiation

NAMES = ("auto", "triton", "cuda", "torch")

# What "auto" tries, per device type, fastest first, for the layer classes that
# auto_choice.json (derived from benchmarks/results/ by `python -m cnnkernels.auto_choice`)
# does not list. A backend is listed only once the benchmark suite measured it faster than the
# next one on that device and the tests passed there. No GPU run has verified our CUDA or
# Triton kernels yet, so on GPUs "auto" is cuDNN through PyTorch.
AUTO_ORDER = {
    "cpu": ("cuda", "torch"),
    "cuda": ("torch",),
}


def _interpreting_triton():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TorchBackend:
    name = "torch"

    def problem(self, device):
        return None

    def conv_unsupported(self, call):
        return []

    def conv(self, call):
        return reference.conv2d_bias_act(call.input, call.weight, call.bias, call.residual, *call.op_args)

    def add_relu_unsupported(self, input, other):
        return []

    def add_relu(self, input, other):
        return reference.add_relu(input, other)


class ExtensionBackend:
    name = "cuda"

    def problem(self, device):
        if _extension.module() is None:
            return _extension.problem()
        if device.type == "cuda" and not _extension.has_cuda_kernels():
            return "the C++ extension was built without its CUDA kernels (a CPU-only build)"
        if device.type not in ("cpu", "cuda"):
            return f"the C++ extension has no kernels for {device.type} tensors"
        return None

    def conv_unsupported(self, call):
        tensors = (call.input, call.weight, call.bias, call.residual)
        return layout_reasons(tensors, ("input", "weight", "bias", "residual")) + unsupported_differentiation(*tensors)

    @staticmethod
    def _ops(*tensors):
        """torch.ops.cnnkernels, or for plain eager calls the extension's direct entry points to
        the same dispatcher ops (cnnkernels._C.conv2d_relu, ...: less host cost, see csrc/ops.cpp)."""
        return _extension.module() if plain_eager(*tensors) else torch.ops.cnnkernels

    def conv(self, call):
        ops = self._ops(call.input, call.weight, call.bias, call.residual)
        if call.residual is None:
            return ops.conv2d_relu(call.input, call.weight, call.bias, *call.op_args)
        return ops.conv2d_add_relu(call.input, call.weight, call.residual, call.bias, *call.op_args)

    def add_relu_unsupported(self, input, other):
        return layout_reasons((input, other), ("input", "other")) + unsupported_differentiation(input, other)

    def add_relu(self, input, other):
        return self._ops(input, other).add_relu(input, other)


class TritonBackend:
    name = "triton"

    def _ops(self):
        from . import triton_ops  # imports triton, so only on first use
        return triton_ops

    def problem(self, device):
        try:
            self._ops()
        except ImportError as error:
            return f"Triton is not usable: {error}"
        if device.type == "cpu" and not _interpreting_triton():
            return ("CPU tensors run the Triton kernels only through Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before importing cnnkernels")
        if device.type not in ("cpu", "cuda"):
            return f"the Triton kernels do not run on {device.type} tensors"
        return None

    def conv_unsupported(self, call):
        return unsupported_differentiation(call.input, call.weight, call.bias, call.residual) + \
            self._ops().unsupported_reasons(call.input, call.weight, call.bias, call.residual, *call.op_args)

    def conv(self, call):
        ops = self._ops()
        if call.residual is None:
            return ops.conv2d_relu_triton(call.input, call.weight, call.bias, *call.op_args)
        return ops.conv2d_add_relu_triton(call.input, call.weight, call.residual, call.bias, *call.op_args)

    def add_relu_unsupported(self, input, other):
        return unsupported_differentiation(input, other) + self._ops().add_relu_unsupported_reasons(input, other)

    def add_relu(self, input, other):
        return self._ops().add_relu_triton(input, other)


BACKENDS = {b.name: b for b in (TorchBackend(), ExtensionBackend(), TritonBackend())}


def _checked_name(name):
    if name not in NAMES:
        raise ValueError(f"cnnkernels: unknown backend {name!r}; expected one of {', '.join(NAMES)}")
    return name


class _Block:
    """One open use_backend block; compared by identity, so that a block removes only itself."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


_base = _checked_name(os.environ.get("CNNKERNELS_BACKEND", "auto"))
# The open use_backend blocks, oldest first. Process-wide, so that DataParallel replicas and
# autograd's device threads see the choice. Each block removes only its own entry, so that blocks
# that threads open and close out of order never leave a finished block's choice behind (a saved
# "previous" value, restored on exit, did). list.append/remove and slicing are atomic under the GIL.
_open_blocks = []


def get_backend():
    """The backend chosen now: the innermost open use_backend block's, else set_backend's
    (or CNNKERNELS_BACKEND's, "auto" unless set)."""
    innermost = _open_blocks[-1:]
    return innermost[0].name if innermost else _base


def set_backend(name):
    """Chooses the backend for every following call, process-wide; inside a use_backend block,
    until the block ends."""
    global _base
    name = _checked_name(name)
    innermost = _open_blocks[-1:]
    if innermost:
        innermost[0].name = name
    else:
        _base = name


@contextlib.contextmanager
def use_backend(name):
    """Runs the block with backend `name`, then restores the previous choice."""
    block = _Block(_checked_name(name))
    _open_blocks.append(block)
    try:
        yield
    finally:
        _open_blocks.remove(block)


def available_backends(device=None):
    """The backend names usable on `device` (default: CUDA if present, else CPU), "auto" first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return ["auto"] + [name for name, b in BACKENDS.items() if b.problem(device) is None]


def why_unavailable(name, device):
    """Why backend `name` cannot run on `device`, or None."""
    return BACKENDS[name].problem(torch.device(device))


def select(op, device, unsupported, layer_class=None):
    """The backend that runs `op` on `device`. `unsupported(backend)` lists what it cannot do;
    `layer_class()` names the call's class in auto_choice.json, which "auto" follows where the
    benchmark results measured that class (AUTO_ORDER elsewhere)."""
    name = get_backend()
    if name != "auto":
        backend = BACKENDS[name]
        problem = backend.problem(device)
        if problem:
            raise RuntimeError(f"cnnkernels: backend {name!r} cannot run {op} on {device.type}: {problem}")
        reasons = unsupported(backend)
        if reasons:
            raise NotImplementedError(f"cnnkernels: backend {name!r} does not support this {op} call: "
                                      + "; ".join(reasons))
        return backend
    measured = auto_choice.order(device.type, layer_class()) if layer_class is not None else None
    candidates = AUTO_ORDER.get(device.type, ()) if measured is None else measured + ("torch",)
    for candidate in candidates:
        backend = BACKENDS[candidate]
        if backend.problem(device) is None and not unsupported(backend):
            return backend
    return BACKENDS["torch"]
