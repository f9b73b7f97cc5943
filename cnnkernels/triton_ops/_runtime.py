"""Facts about where and how the Triton kernels run: interpreter, fake tensors, devices, TF32."""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .._args import FORWARD_AD_UNSUPPORTED, has_tangent, layout_reasons, plain_eager
from .._registration import autograd_function

try:
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - very old triton
    _InterpretedFunction = ()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated while TRITON_INTERPRET=1 (it then runs on the CPU)."""
    return isinstance(kernel, _InterpretedFunction)


def is_fake(t: torch.Tensor) -> bool:
    """Fake, meta or functional-over-fake tensors: shape propagation only, no data."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)


def should_launch(kernel, *tensors) -> bool:
    """Whether the op body may launch `kernel` on these tensors.

    Meta tensors never launch. On the GPU, `wrap_triton` turns the launch into a higher-order op
    that does nothing on fake tensors and is recorded by torch.compile, so we "launch". The
    interpreter's kernels bypass that machinery and would really run on fake tensors, so there
    we skip the launch for shape propagation, and refuse functional tracing rather than trace a
    graph whose output is never written.
    """
    tensors = [t for t in tensors if t is not None]
    if any(t.device.type == "meta" for t in tensors):
        return False
    if not is_interpreted(kernel) or not any(is_fake(t) for t in tensors):
        return True
    from torch._subclasses.functional_tensor import FunctionalTensor

    if any(isinstance(t, FunctionalTensor) for t in tensors):
        raise RuntimeError(
            "cnnkernels: torch.compile/export of the Triton ops is not supported under "
            "TRITON_INTERPRET=1 (the interpreter cannot run on traced tensors); use eager mode"
        )
    return False


def refuse_forward_ad(op_name, *tensors):
    """torch.library's autograd for our ops has no jvp and hands dual tensors on as they are, so
    the op would drop their tangents: raise instead (the public functions run such calls on the
    reference, see _args.unsupported_differentiation)."""
    if has_tangent(*tensors):
        raise NotImplementedError(f"{op_name}: {FORWARD_AD_UNSUPPORTED}")


def call_op(op, *args, mutated=(), autograd=None):
    """op(*args) for one of our torch.library.triton_op ops, straight into its Python body when
    the call is plain eager work: plain tensors, and nothing compiling, intercepting
    (__torch_function__ or dispatch modes, functorch transforms) or profiling. The body
    (triton_op's eager kernel, which turns wrap_triton off itself) launches the Triton kernels,
    and the `mutated` tensors get the version bump the op's ADInplaceOrView kernel would give
    them. A call that autograd tracks runs the body inside an autograd.Function with the op's
    registered rule, `autograd` (an AutogradRule of cnnkernels/_registration.py), or takes the
    dispatcher without one. Any other call goes through the dispatcher.

    The dispatcher's way cost, per call on the CPU dev box (benchmarks/results/
    2026-12-05_CPU-AMD-EPYC-2-threads_host-overhead*.txt): about 90 us per fused BN forward and
    backward pair (345-351 against 260-263 us), 35 us per no-grad conv2d_relu (90-94 against
    57 us) and over 100 us per conv2d_relu forward and backward (489-541 against 374-385 us)."""
    body = getattr(op, "_init_fn", None)
    if (body is None or not plain_eager(*args)  # plain_eager: also no functorch transform, no forward AD
            or torch._C._len_torch_dispatch_stack() or torch.autograd.profiler._is_profiler_enabled):
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        if autograd is None:
            return op(*args)
        return _autograd_function(op, autograd).apply(*args)
    result = body(*args)
    for t in mutated:
        if t is not None:
            torch.autograd.graph.increment_version(t)
    return result


@functools.lru_cache(maxsize=None)
def _autograd_function(op, rule):
    return autograd_function(op._init_fn, rule)


def launcher(kernel):
    """What to index with the grid to launch `kernel`: `wrap_triton(kernel)`, which torch.compile
    can trace, or under the interpreter the kernel itself (torch < 2.13's wrap_triton accepts only
    compiled kernels; interpreted ones never see traced tensors, see should_launch)."""
    return kernel if is_interpreted(kernel) else torch.library.wrap_triton(kernel)


def hint(v) -> int:
    """A concrete int for a possibly symbolic size (torch.compile tracing), without adding a guard."""
    if isinstance(v, torch.SymInt):
        h = v.node.hint
        return int(h) if h is not None else 0
    return int(v)


def cdiv(a, b):
    """ceil(a / b) for host-side grid sizes: triton.cdiv is a ConstexprFunction in newer Tritons,
    whose call from Python costs microseconds."""
    return (a + b - 1) // b


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_slots(device: torch.device) -> int:
    """How many programs a persistent kernel launches: one per SM of a GPU; 4 for the
    interpreter on the CPU, so that its tests see programs walking several tiles."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 at least n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def device_reasons(kernel, tensors, names) -> list:
    """Why the Triton path cannot take tensors on these devices / of these dtypes (empty if it can)."""
    reasons = []
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        found = ", ".join(sorted(str(d) for d in devices))
        reasons.append(f"all tensors must be on the same device, found {found}")
    reasons += layout_reasons(tensors, names)
    for t, name in zip(tensors, names):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        reasons.append("all tensors must have the same dtype, found " + ", ".join(sorted(map(str, dtypes))))
    for d in devices:
        if d.type == "cuda":
            if is_interpreted(kernel):
                reasons.append("CUDA tensors are not supported while TRITON_INTERPRET=1 (the kernels run on the CPU)")
        elif d.type == "cpu":
            if not is_interpreted(kernel):
                reasons.append("CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
        elif d.type != "meta":
            reasons.append(f"device type {d.type!r} is not supported (CUDA only, or CPU under TRITON_INTERPRET=1)")
    return reasons


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensor's device."""
    if t.device.type == "cuda" and not is_fake(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def cudnn_conv_allows_tf32() -> bool:
    """The flag cuDNN's convolutions obey: torch.backends.cudnn.allow_tf32, or the newer
    torch.backends.cudnn.conv.fp32_precision (reading allow_tf32 raises when the two APIs were mixed)."""
    try:
        for precision in (
            torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.fp32_precision,
            torch.backends.fp32_precision,
        ):
            if precision != "none":
                return precision == "tf32"
        return False
    except AttributeError:  # torch without the fp32_precision API
        return bool(torch.backends.cudnn.allow_tf32)


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def triton_version() -> str:
    return triton.__version__


@triton.jit
def store_cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x.to(dtype), except that the interpreter's float32 -> bfloat16 cast truncates: round to
    nearest even by hand there, as the GPU does."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
