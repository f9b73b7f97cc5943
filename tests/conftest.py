"""Shared test helpers: devices, the float64 reference check, poisoned outputs."""
import atexit
import contextlib
import fcntl
import gc
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Triton's interpreter must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The CPU Winograd kernels run wherever the geometry suits them, not only where they measure
# faster than oneDNN on this machine: the tests are there to check them (csrc/cpu/winograd.cpp;
# tests/test_cpu_winograd.py checks the measured choice in a process of its own).
os.environ.setdefault("CNNKERNELS_CPU_WINOGRAD", "1")

# Each test run compiles afresh, in a torch.compile cache of its own: what the tests measure is
# then never a graph that an earlier run (or another checkout) left behind.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnnkernels-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

REQUIRE_CUDA = os.environ.get("CNNKERNELS_REQUIRE_CUDA", "0") == "1"
HAVE_CUDA = torch.cuda.is_available()


def cuda_or_skip():
    """Skips the calling test without a GPU, or fails it when CNNKERNELS_REQUIRE_CUDA=1."""
    if HAVE_CUDA:
        return
    if REQUIRE_CUDA:
        pytest.fail("CNNKERNELS_REQUIRE_CUDA=1 but no CUDA device is available")
    pytest.skip("needs a CUDA GPU")


def device_param(device):
    return pytest.param(device, marks=pytest.mark.gpu) if device == "cuda" else device


DEVICES = [device_param("cpu"), device_param("cuda")]
BACKENDS = ["torch", "cuda", "triton", "auto"]

# The floor of the tolerance rule: normwise relative error allowed even when PyTorch's own
# error in the same dtype is near zero.
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The most of PyTorch's own error the bound takes in, so that a PyTorch that goes wrong itself
# (oneDNN's bf16 one-column outputs in test_ops: relative errors of 1e30 and more) cannot widen
# it. The largest seen in the suite on the CPU: fp32 2.7e-6, fp16 2.8e-4, bf16 0.071 (batch
# norm); fp32 leaves room for TF32 on a GPU (10 mantissa bits: about 1e-3).
ERROR_CEILING = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 0.1}


def interpreting_triton():
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _device_gate(request):
    """Tests marked `gpu` or parametrized with device="cuda" need a GPU. Triton on CPU tensors
    needs the interpreter, which CI uses and GPU machines do not."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if request.node.get_closest_marker("gpu") or params.get("device") == "cuda":
        cuda_or_skip()
    if params.get("device", "cpu") == "cpu" and params.get("backend") == "triton" and not interpreting_triton():
        pytest.skip("Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1, as in CI)")


@pytest.fixture(autouse=True)
def _one_big_gpu_test_at_a_time(request):
    """Tests marked `big_gpu_memory` (outputs past 2^31 elements, 10-30 GiB each) take a lock
    that pytest-xdist's workers share, so that two of them never hold the GPU's memory at once,
    and give their memory back to the GPU when they end."""
    if request.node.get_closest_marker("big_gpu_memory") is None or not HAVE_CUDA:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "cnnkernels-big-gpu-memory.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            gc.collect()
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _fresh_call_plans():
    """Tests monkeypatch what the backend choice reads: no test reuses another's choices."""
    from cnnkernels import _call_plans
    _call_plans.clear()


def cpu_conv_runs_in_fp32(dtype):
    """Whether the C++ CPU kernels run convs in this 16-bit dtype in fp32 on this CPU, where
    PyTorch's oneDNN lacks the dtype (AVX-512 BW for bf16, AVX-512 FP16 for fp16)."""
    from cnnkernels import _extension

    return _extension.require().cpu_conv_runs_in_fp32(torch.empty(0, dtype=dtype))


def relative_error(out, ref):
    """Normwise, over the elements where the reference is finite (assert_matches_reference
    checks the others exactly)."""
    finite = ref.isfinite()
    diff = torch.where(finite, (out.double() - ref).nan_to_num(0.0), 0.0)
    return (diff.norm() / torch.where(finite, ref, 0.0).norm().clamp_min(1e-30)).item()


def place_values(t, values, first_row=1):
    """Writes `values` (e.g. "nan", "-inf") into the 4-D tensor t, spread over images, channels
    and rows; returns t."""
    n, c, h, w = t.shape
    for i, value in enumerate(values):
        t[i % n, i % c, (first_row + 3 * i) % h, (5 * i) % w] = float(value)
    return t


def counts_under_env(code, variable, values):
    """{value: the last number `code` prints} with environment `variable` set to each value, each
    in a fresh process (the C++ switches are read once per process)."""
    counts = {}
    for value in values:
        env = dict(os.environ, **{variable: value})
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        counts[value] = int(result.stdout.split()[-1])
    return counts


def assert_matches_reference(out, ref64, torch_same_dtype):
    """The tolerance rule: our error against the float64 reference is at most twice PyTorch's
    own error in the same dtype (up to a ceiling), plus a small floor. NaN and infinities must
    appear exactly where the reference has them, and everywhere else the output must be written."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert out.dtype == torch_same_dtype.dtype
    assert torch.equal(out.isnan(), ref64.isnan()), "NaN positions differ from the reference"
    inf = ref64.isinf()
    assert torch.equal(out.isinf(), inf) and torch.equal(out[inf].double(), ref64[inf]), \
        "infinities differ from the reference"
    ours = relative_error(out, ref64)
    theirs = relative_error(torch_same_dtype, ref64)
    bound = min(2 * theirs, ERROR_CEILING[out.dtype]) + ERROR_FLOOR[out.dtype]
    assert ours <= bound, f"relative error {ours:.3g} > {bound:.3g} (PyTorch's own: {theirs:.3g})"


def conv_output_memory_format(x, weight):
    """channels_last when the input or the weight is (torch's suggest_memory_format), as F.conv2d
    lays out its output on the CPU and through cuDNN; contiguous for an empty batch."""
    suggest = torch._prims_common.suggest_memory_format
    cl = torch.channels_last
    if x.numel() == 0:
        return torch.contiguous_format
    return cl if cl in (suggest(x), suggest(weight)) else torch.contiguous_format


def memory_format_of(t):
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated by torch.empty* (ours included) starts filled with NaN, so an
    element a kernel forgets to write shows up as NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def spy_op_calls(monkeypatch, *ops):
    """Replaces each triton_op `module.name` of ops, given as (module, name) pairs, by a stand-in
    that runs it as before and logs which way each call took: (name, "direct") when
    _runtime.call_op ran the op's body, (name, "dispatcher") otherwise."""
    calls = []
    for module, name in ops:
        op = getattr(module, name)

        class Spy:
            _init_fn = staticmethod(lambda *args, op=op, name=name: calls.append((name, "direct"))
                                    or op._init_fn(*args))

            def __call__(self, *args, op=op, name=name):
                calls.append((name, "dispatcher"))
                return op(*args)

        monkeypatch.setattr(module, name, Spy())
    return calls


def _logging(mode_class, hook):
    """A mode of mode_class whose `hook` records the name of every function or op it sees in .ops."""
    def __init__(self):
        mode_class.__init__(self)
        self.ops = []

    def log(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    return type(f"Log{mode_class.__name__}", (mode_class,), {"__init__": __init__, hook: log})


LogOps = _logging(TorchDispatchMode, "__torch_dispatch__")  # ops as the dispatcher runs them
LogFunctions = _logging(TorchFunctionMode, "__torch_function__")  # torch functions and torch.ops calls
