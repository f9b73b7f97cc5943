"""The public API: argument forms, bad input, backend choice, modules, opcheck and gradcheck."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnkernels
from cnnkernels import backends
from conftest import BACKENDS, DEVICES, LogFunctions, interpreting_triton

CONV_FORMS = [  # keyword arguments exactly as F.conv2d takes them
    dict(), dict(stride=2), dict(stride=(2, 1), padding=(1, 2)), dict(padding="same"), dict(padding="valid"),
    dict(padding=[1], dilation=(2,)), dict(padding="same", dilation=2), dict(stride=[1, 3], padding=1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", CONV_FORMS, ids=str)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_argument_forms_match_f_conv2d(form, batched, backend):
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    w, b = torch.randn(6, 4, 3, 2, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    if not batched:
        x = x[0]
    expected = F.conv2d(x, w, b, **form)
    residual = torch.randn_like(expected)
    with cnnkernels.use_backend(backend):
        for _ in range(2):  # the second time from the call's plan (cnnkernels/_call_plans.py) where it has one
            assert torch.allclose(cnnkernels.conv2d_relu(x, w, b, **form), expected.relu())
            assert torch.allclose(cnnkernels.conv2d_add_relu(x, w, residual, b, **form), (expected + residual).relu())
            assert torch.allclose(cnnkernels.conv2d_relu(x, w, None, **form), F.conv2d(x, w, None, **form).relu())


def _conv_inputs():
    return torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(6)


BAD_CONV_CALLS = {  # name: (kwargs edits, exception type, message fragment)
    "channel mismatch": (dict(input=torch.randn(2, 5, 8, 8)), RuntimeError, "to have 4 channels, but got 5"),
    "groups do not divide": (dict(groups=4, weight=torch.randn(6, 1, 3, 3)), RuntimeError,
                             "divisible by 4 at dimension 0"),
    "groups not positive": (dict(groups=0), RuntimeError, "non-positive groups"),
    "bias shape": (dict(bias=torch.randn(5)), RuntimeError, "expected bias to be 1-dimensional with 6 elements"),
    "stride zero": (dict(stride=0), RuntimeError, "non-positive stride"),
    "dilation zero": (dict(dilation=(1, 0)), RuntimeError, "dilation should be greater than zero"),
    "negative padding": (dict(padding=-1), RuntimeError, "negative padding"),
    "kernel larger than input": (dict(weight=torch.randn(6, 4, 11, 11)), RuntimeError,
                                 "Kernel size can't be greater than actual input size"),
    # Empty weights: F.conv2d refuses the first two, and gives the third an output of 0 channels.
    "no output channels": (dict(weight=torch.randn(0, 4, 3, 3), bias=None), RuntimeError,
                           "expected weight to be at least 1 at dimension 0"),
    "empty kernel": (dict(weight=torch.randn(6, 4, 0, 3)), RuntimeError, "kernel size should be greater than zero"),
    "no input channels": (dict(input=torch.randn(2, 0, 8, 8), weight=torch.randn(6, 0, 3, 3)), RuntimeError,
                          "expected weight to be at least 1 at dimension 1"),
    "empty image": (dict(input=torch.randn(2, 4, 0, 8)), RuntimeError,
                    "only zero batch or zero channel inputs are supported, but got input shape: .2, 4, 0, 8."),
    "input ndim": (dict(input=torch.randn(4, 8, 8, 1, 1)), RuntimeError, "expected 3D (unbatched) or 4D"),
    "weight ndim": (dict(weight=torch.randn(6, 4, 3)), RuntimeError, "expected 4D weight"),
    "dtype mismatch": (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), RuntimeError,
                       "expected weight to have the same dtype as input"),
    "bias dtype": (dict(bias=torch.randn(6, dtype=torch.bfloat16)), RuntimeError,
                   "expected bias to have the same dtype"),
    "integer input": (dict(input=torch.ones(2, 4, 8, 8, dtype=torch.int64),
                           weight=torch.ones(6, 4, 3, 3, dtype=torch.int64), bias=None), RuntimeError,
                      "expected a floating-point input"),
    "stride of 3 values": (dict(stride=(1, 1, 1)), RuntimeError, "list of 2 values"),
    "padding string": (dict(padding="full"), ValueError, "Invalid padding string 'full'"),
    "same with stride": (dict(padding="same", stride=2), ValueError, "not supported for strided"),
    "input not a tensor": (dict(input=[[1.0]]), TypeError, "must be Tensor"),
    "float stride": (dict(stride=1.5), TypeError, "stride must be an int"),
    # Equal to the valid call's 1 as a dict key, so a plan must not answer for them:
    "bool stride": (dict(stride=True), TypeError, "stride must be an int"),
    "float stride equal to an int": (dict(stride=1.0), TypeError, "stride must be an int"),
    "bool in a stride tuple": (dict(stride=(True, 1)), RuntimeError, "list of 2 values"),
    "bool groups": (dict(groups=True), TypeError, "groups must be an int"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_CONV_CALLS)
def test_bad_conv_input_raises_clearly(case, backend):
    edits, error, fragment = BAD_CONV_CALLS[case]
    x, w, b = _conv_inputs()
    valid = dict(input=x, weight=w, bias=b, stride=1, padding=1, dilation=1, groups=1)
    args = valid | edits
    with cnnkernels.use_backend(backend):
        cnnkernels.conv2d_relu(**valid)  # leaves a plan for the valid call: the bad one must not use it
    with cnnkernels.use_backend(backend), pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        cnnkernels.conv2d_relu(**args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_shape", [(0, 4, 8, 8), (0, 4, 0, 8)], ids=["empty-batch", "empty-batch-and-image"])
@pytest.mark.parametrize("channels_last", ["none", "input", "weight"])
def test_an_empty_batch_gives_what_f_conv2d_gives(backend, input_shape, channels_last):
    """F.conv2d takes an empty batch, even of empty images (it refuses those only in a nonempty
    batch): the output, its gradients (zeros for the weight and bias), their shapes and strides
    match (F.conv2d's output is contiguous there, whatever the operands' layout). ATen's own CPU
    conv kernels, which the C++ op called, refused the empty images."""
    x, w, b = torch.randn(input_shape), torch.randn(6, 4, 1, 3), torch.randn(6, requires_grad=True)
    if channels_last == "input":
        x = x.contiguous(memory_format=torch.channels_last)
    if channels_last == "weight":
        w = w.contiguous(memory_format=torch.channels_last)
    x, w = x.requires_grad_(), w.requires_grad_()
    expected = F.conv2d(x, w, b, padding=1)
    expected_grads = torch.autograd.grad(expected.sum(), [x, w, b])
    with cnnkernels.use_backend(backend):
        out = cnnkernels.conv2d_add_relu(x, w, torch.randn(expected.shape), b, padding=1)
    assert (out.shape, out.stride()) == (expected.shape, expected.stride())
    grads = torch.autograd.grad(out.sum(), [x, w, b])
    assert [(g.shape, g.stride()) for g in grads] == [(g.shape, g.stride()) for g in expected_grads]
    assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_residual_and_other_raise_clearly(backend):
    x, w, b = _conv_inputs()
    with cnnkernels.use_backend(backend):
        cnnkernels.conv2d_add_relu(x, w, torch.randn(2, 6, 8, 8), b, padding=1)  # plans for valid calls
        cnnkernels.add_relu(torch.randn(2, 3), torch.randn(2, 3))
        with pytest.raises(RuntimeError, match=r"expected residual of size \[2, 6, 8, 8\]"):
            cnnkernels.conv2d_add_relu(x, w, torch.randn(2, 6, 8, 7), b, padding=1)
        with pytest.raises(RuntimeError, match="expected residual to have the same dtype"):
            cnnkernels.conv2d_add_relu(x, w, torch.randn(2, 6, 8, 8, dtype=torch.float64), b, padding=1)
        with pytest.raises(RuntimeError, match=r"expected other of size \[2, 3\] to match input"):
            cnnkernels.add_relu(torch.randn(2, 3), torch.randn(3))
        with pytest.raises(RuntimeError, match="expected other to have the same dtype"):
            cnnkernels.add_relu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_device_mismatch_raises(backend):
    x, w, b = _conv_inputs()
    with cnnkernels.use_backend(backend), pytest.raises(RuntimeError, match="same device"):
        cnnkernels.conv2d_relu(x.cuda(), w, b)
    with cnnkernels.use_backend(backend), pytest.raises(RuntimeError, match="same device"):
        cnnkernels.add_relu(x.cuda(), x)


@pytest.mark.parametrize("entry", ["torch.ops", "cnnkernels._C"])
def test_cpp_ops_check_their_arguments_when_called_directly(entry):
    """Through torch.ops and through the extension's direct entry points alike, in PyTorch's
    wording and without a C++ backtrace."""
    x, w, b = _conv_inputs()
    ops = torch.ops.cnnkernels if entry == "torch.ops" else cnnkernels._extension.require()
    with pytest.raises(RuntimeError, match="to have 4 channels, but got 5") as error:
        ops.conv2d_relu(torch.randn(2, 5, 8, 8), w, b, [1, 1], [1, 1], [1, 1], 1)
    assert "Exception raised from" not in str(error.value)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        ops.conv2d_relu(x, torch.randn(6, 4, 9, 9), b, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="expected residual of size"):
        ops.conv2d_add_relu(x, w, torch.randn(2, 6, 3, 3), b, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="non-positive stride"):
        ops.conv2d_relu(x, w, b, [0, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="kernel size should be greater than zero"):
        ops.conv2d_relu(x, torch.randn(6, 4, 3, 0), b, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="expected weight to be at least 2 at dimension 0"):
        ops.conv2d_relu(x, torch.randn(0, 2, 3, 3), None, [1, 1], [1, 1], [1, 1], 2)
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 1"):
        ops.conv2d_relu(torch.randn(2, 0, 8, 8), torch.randn(6, 0, 3, 3), b, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="to match input"):
        ops.add_relu(x, x[:1])


def test_cuda_backend_calls_the_extension_directly_unless_torch_function_must_see_the_op(monkeypatch):
    """Plain eager calls skip torch.ops' Python layer (host cost per call; csrc/ops.cpp) and give
    the same bits; under a __torch_function__ mode the calls go through torch.ops, which it sees."""
    from cnnkernels import _extension

    extension, entered = _extension.require(), []

    class Recorder:
        def __getattr__(self, name):
            entered.append(name)
            return getattr(extension, name)

    x, w, b = _conv_inputs()
    residual = torch.randn(2, 6, 8, 8)

    def calls():
        with cnnkernels.use_backend("cuda"):
            return [cnnkernels.conv2d_relu(x, w, b, padding=1), cnnkernels.conv2d_add_relu(x, w, residual, b, padding=1),
                    cnnkernels.add_relu(x, residual[:, :4])]

    via_torch_ops = [torch.ops.cnnkernels.conv2d_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1),
                     torch.ops.cnnkernels.conv2d_add_relu(x, w, residual, b, [1, 1], [1, 1], [1, 1], 1),
                     torch.ops.cnnkernels.add_relu(x, residual[:, :4])]
    monkeypatch.setattr(_extension, "_module", Recorder())
    direct = calls()
    assert entered == ["conv2d_relu", "conv2d_add_relu", "add_relu"]
    for got, expected in zip(direct, via_torch_ops):
        assert torch.equal(got, expected)
    entered.clear()
    with LogFunctions() as log:
        seen = calls()
    assert entered == []
    assert [name for name in log.ops if "cnnkernels" in name] == [
        "cnnkernels.conv2d_relu", "cnnkernels.conv2d_add_relu", "cnnkernels.add_relu"]
    for got, expected in zip(seen, via_torch_ops):
        assert torch.equal(got, expected)


# --- backend choice -------------------------------------------------------------------------

def test_backend_choice_api():
    assert cnnkernels.get_backend() == "auto"
    with cnnkernels.use_backend("torch"):
        assert cnnkernels.get_backend() == "torch"
        with cnnkernels.use_backend("cuda"):
            assert cnnkernels.get_backend() == "cuda"
        assert cnnkernels.get_backend() == "torch"
    assert cnnkernels.get_backend() == "auto"
    cnnkernels.set_backend("torch")
    try:
        assert cnnkernels.get_backend() == "torch"
    finally:
        cnnkernels.set_backend("auto")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        cnnkernels.set_backend("cudnn")
    with cnnkernels.use_backend("torch"):
        cnnkernels.set_backend("cuda")  # inside a block: until the block ends
        assert cnnkernels.get_backend() == "cuda"
    assert cnnkernels.get_backend() == "auto"


def test_use_backend_blocks_that_threads_close_out_of_order_leave_no_choice_behind():
    """Thread A opens "torch", thread B opens "cuda", A closes, B closes. Before, each block
    restored the value it saw on entry, which left "torch" chosen for good."""
    import threading
    steps = {name: threading.Event() for name in ("a_in", "b_in", "a_out")}
    seen = {}

    def a():
        with cnnkernels.use_backend("torch"):
            steps["a_in"].set()
            steps["b_in"].wait(10)
        seen["after_a"] = cnnkernels.get_backend()
        steps["a_out"].set()

    def b():
        steps["a_in"].wait(10)
        with cnnkernels.use_backend("cuda"):
            steps["b_in"].set()
            steps["a_out"].wait(10)
    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["after_a"] == "cuda"  # B's block is still open
    assert cnnkernels.get_backend() == "auto"


def test_every_backend_is_available_on_the_cpu():
    """CI builds the extension and runs Triton through its interpreter: all four must work there."""
    expected = ["auto", "torch", "cuda"] + (["triton"] if interpreting_triton() else [])
    assert cnnkernels.available_backends("cpu") == expected


def test_auto_picks_the_cpu_kernels_and_falls_back_for_unsupported_calls(monkeypatch):
    x, w, b = _conv_inputs()
    picked = backends.select("conv2d_relu", x.device, lambda backend: [])
    assert picked.name == "cuda"
    monkeypatch.setattr(backends.ExtensionBackend, "conv_unsupported", lambda self, call: ["pretend dtype"])
    calls = []
    monkeypatch.setattr(backends.TorchBackend, "conv", lambda self, call: calls.append(call) or torch.zeros(1))
    cnnkernels.conv2d_relu(x, w, b)
    assert len(calls) == 1  # "auto" fell back to the reference
    with cnnkernels.use_backend("cuda"), pytest.raises(NotImplementedError, match="pretend dtype"):
        cnnkernels.conv2d_relu(x, w, b)


@pytest.mark.parametrize("layout", ["sparse", "mkldnn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_and_mkldnn_tensors_run_as_pytorch_runs_them_under_auto(backend, layout):
    """Our kernels take dense tensors only: "auto" runs other layouts as PyTorch does (sparse
    add works, sparse conv raises F.conv2d's error, mkldnn both work); our backends refuse them.
    Before, "auto" and "cuda" raised the dispatcher's "Could not run ... 'SparseCPU' backend"."""
    x, w, _ = _conv_inputs()
    to_layout = (lambda t: t.to_sparse()) if layout == "sparse" else (lambda t: t.to_mkldnn())
    cases = [(lambda v: cnnkernels.add_relu(v, v), lambda v: torch.relu(v + v)),
             (lambda v: cnnkernels.conv2d_relu(v, w, padding=1), lambda v: torch.relu(F.conv2d(v, w, padding=1)))]
    with cnnkernels.use_backend(backend):
        for ours, pytorch in cases:
            if backend in ("cuda", "triton"):
                with pytest.raises(NotImplementedError, match="only dense .strided. tensors are supported"):
                    ours(to_layout(x))
                continue
            try:
                expected = pytorch(to_layout(x))
            except RuntimeError as error:
                with pytest.raises(RuntimeError, match=re.escape(str(error))):
                    ours(to_layout(x))
                continue
            got = ours(to_layout(x))
            assert got.layout == expected.layout
            torch.testing.assert_close(got.to_dense(), expected.to_dense())


def test_repeated_calls_reuse_their_checks_and_backend_choice_until_something_changes(monkeypatch):
    """A call of a signature seen before skips the argument checks and the backend choice
    (cnnkernels/_call_plans.py); anything the choice reads, or a mode that must see the call,
    makes it check and choose again."""
    from cnnkernels import _args, _call_plans, auto_choice, functional
    checked, chosen = [], []
    real_check, real_select = functional.conv_call, backends.select
    monkeypatch.setattr(functional, "conv_call", lambda *a, **k: checked.append(1) or real_check(*a, **k))
    monkeypatch.setattr(backends, "select", lambda *a: chosen.append(cnnkernels.get_backend()) or real_select(*a))
    x, w, b = _conv_inputs()
    residual = torch.randn(2, 6, 8, 8)

    def counted(fn):
        checked.clear(), chosen.clear()
        out = fn()
        return len(checked), len(chosen), out

    expected = F.conv2d(x, w, b, padding=1).relu()
    for backend in ["cuda", "torch"]:
        with cnnkernels.use_backend(backend):
            assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=1))[:2] == (1, 1)
            n_checks, n_choices, out = counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=1))
            assert (n_checks, n_choices) == (0, 0)
            assert torch.allclose(out, expected, atol=1e-5)
            out = cnnkernels.conv2d_relu(torch.randn_like(x), w, b, padding=1)  # new data, same signature
            assert checked == [] and out.shape == expected.shape
    with cnnkernels.use_backend("cuda"):
        assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=(1, 1)))[:2] == (1, 1)  # another form
        assert counted(lambda: cnnkernels.conv2d_relu(x.double(), w.double(), b.double(), padding=1))[:2] == (1, 1)
        assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=[1, 1]))[:2] == (1, 1)  # lists: never planned
        assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=[1, 1]))[:2] == (1, 1)
        assert counted(lambda: cnnkernels.conv2d_relu(x[0], w, b, padding=1))[:2] == (1, 1)  # unbatched: never
        assert counted(lambda: cnnkernels.conv2d_relu(x[0], w, b, padding=1))[:2] == (1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the signature is the cast call's
            assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=1))[:2] == (1, 1)
            n_checks, n_choices, out = counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=1))
            assert (n_checks, n_choices, out.dtype) == (0, 0, torch.bfloat16)
        with LogFunctions():
            assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=1))[:2] == (1, 1)
        cnnkernels.conv2d_add_relu(x, w, residual, b, padding=1)
        assert counted(lambda: cnnkernels.conv2d_add_relu(x, w, residual, b, padding=1))[:2] == (0, 0)
        assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=1))[:2] == (0, 0)
        auto_choice.reload()  # a new auto_choice.json may choose differently
        assert counted(lambda: cnnkernels.conv2d_relu(x, w, b, padding=1))[:2] == (1, 1)
    y = torch.randn(2, 3)
    cnnkernels.add_relu(y, y)
    assert counted(lambda: cnnkernels.add_relu(y, y))[1] == 0
    with cnnkernels.use_backend("torch"):
        assert counted(lambda: cnnkernels.add_relu(y, y))[1] == 1
    monkeypatch.setattr(_args, "MAX_CACHED", 2)
    for n in range(1, 6):  # many signatures: the table starts over rather than grow
        cnnkernels.add_relu(torch.randn(n), torch.randn(n))
        assert len(_call_plans._plans) <= 2


def _python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=300)


def test_environment_variable_chooses_the_backend():
    done = _python("import cnnkernels; print(cnnkernels.get_backend())", CNNKERNELS_BACKEND="torch")
    assert done.stdout.strip() == "torch", done.stderr
    done = _python("import cnnkernels", CNNKERNELS_BACKEND="fastest")
    assert done.returncode != 0 and "unknown backend 'fastest'" in done.stderr


@pytest.mark.skipif(not interpreting_triton(), reason="GPU machines: Triton is not in interpreter mode")
def test_triton_on_cpu_without_the_interpreter_says_how():
    done = _python("import torch, cnnkernels\n"
                   "with cnnkernels.use_backend('triton'):\n"
                   "    cnnkernels.add_relu(torch.ones(2), torch.ones(2))")
    assert done.returncode != 0 and "TRITON_INTERPRET=1" in done.stderr, done.stderr


def test_extension_built_for_another_torch_is_not_loaded():
    done = _python(
        "import sys, types\n"
        "sys.modules['cnnkernels._build_info'] = types.SimpleNamespace(TORCH_VERSION='1.0.0', CUDA_ARCHS='')\n"
        "import torch, cnnkernels\n"
        "x = torch.randn(1, 2, 5, 5); w = torch.randn(3, 2, 3, 3)\n"
        "with cnnkernels.use_backend('torch'):\n"
        "    assert cnnkernels.conv2d_relu(x, w).shape == (1, 3, 3, 3)\n"
        "print('backends', cnnkernels.available_backends('cpu'))\n"
        "with cnnkernels.use_backend('cuda'):\n"
        "    cnnkernels.conv2d_relu(x, w)\n", TRITON_INTERPRET="1")
    assert "backends ['auto', 'torch', 'triton']" in done.stdout, done.stderr
    assert "built for torch 1.0.0, running torch " + torch.__version__ in done.stderr, done.stderr


def test_extension_lacking_an_op_is_not_used():
    """A .so older than the Python code (an op missing) is refused with a rebuild hint."""
    done = _python(
        "import torch\n"
        "get = torch._ops._OpNamespace.__getattr__\n"
        "def hide(self, name):\n"
        "    if self.__name__.endswith('cnnkernels') and name == 'relu_backward_bias_grad':\n"
        "        raise AttributeError(name)\n"
        "    return get(self, name)\n"
        "torch._ops._OpNamespace.__getattr__ = hide\n"
        "import cnnkernels\n"
        "print('backends', cnnkernels.available_backends('cpu'))\n"
        "with cnnkernels.use_backend('cuda'):\n"
        "    cnnkernels.add_relu(torch.ones(2), torch.ones(2))\n", TRITON_INTERPRET="1")
    assert "backends ['auto', 'torch', 'triton']" in done.stdout, done.stderr
    assert "out of date: it lacks cnnkernels::relu_backward_bias_grad" in done.stderr, done.stderr


# --- modules --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding="same", bias=False),
                                    dict(stride=2, padding=2, padding_mode="reflect"), dict(groups=2, dilation=2)],
                         ids=str)
def test_conv2d_relu_module_is_a_drop_in_conv2d(kwargs):
    ours = cnnkernels.nn.Conv2dReLU(4, 6, 3, **kwargs)
    conv = nn.Conv2d(4, 6, 3, **kwargs)
    assert isinstance(ours, nn.Conv2d)
    assert ours.state_dict().keys() == conv.state_dict().keys()
    conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(ours(x), torch.relu(conv(x)), atol=1e-5)
    ours(x).sum().backward()
    assert ours.weight.grad is not None and ours.weight.grad.abs().sum() > 0


def test_add_relu_module():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(cnnkernels.nn.AddReLU()(a, b), torch.relu(a + b))


# --- opcheck and gradcheck ------------------------------------------------------------------

def _op_samples(device, dtype=torch.float32, requires_grad=False):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)
    x_cl = torch.randn(2, 4, 7, 7, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return [
        ("conv2d_relu", (t(2, 4, 7, 7), t(6, 4, 3, 3), t(6), [1, 1], [1, 1], [1, 1], 1)),
        ("conv2d_relu", (x_cl.requires_grad_(requires_grad), t(6, 2, 3, 3), None, [2, 1], [0, 1], [1, 2], 2)),
        ("conv2d_add_relu", (t(2, 4, 7, 7), t(6, 4, 3, 3), t(2, 6, 7, 7), t(6), [1, 1], [1, 1], [1, 1], 1)),
        ("add_relu", (t(3, 4, 5, 6), t(3, 4, 5, 6))),
        ("add_relu", (t(5, 3).t(), t(5, 3).t())),  # the same transposed strides, which the output keeps
        ("add_relu", (t(2, 5, 3, 4).transpose(1, 3), t(2, 4, 3, 5))),  # torch's rule for mixed layouts
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_cpp_ops(device):
    for name, args in _op_samples(device, requires_grad=True):
        torch.library.opcheck(getattr(torch.ops.cnnkernels, name).default, args)


@pytest.mark.gpu  # under the CPU interpreter, opcheck cannot run Triton on fake tensors
def test_opcheck_triton_ops_on_gpu():
    import cnnkernels.triton_ops  # noqa: F401  registers the ops
    for name, args in _op_samples("cuda", requires_grad=True):
        torch.library.opcheck(getattr(torch.ops.cnnkernels, name + "_triton").default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_in_float64(backend, device):
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float64, requires_grad=True)
    x, w, b, r = t(1, 2, 4, 4), t(3, 2, 2, 2), t(3), t(1, 3, 3, 3)
    a, other = t(2, 3), t(2, 3)
    with cnnkernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *p: cnnkernels.conv2d_relu(*p, stride=(1, 2), padding=1),
                                        (x, w, b))
        assert torch.autograd.gradcheck(lambda *p: cnnkernels.conv2d_add_relu(p[0], p[1], p[3], p[2], padding=(0, 1),
                                                                              stride=(1, 2)), (x, w, b, r))
        assert torch.autograd.gradcheck(cnnkernels.add_relu, (a, other))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_in_float64(backend, device):
    """Gradients taken with create_graph=True differentiate again correctly (gradient penalties,
    Hessian-vector products). Before, the C++ ops' bias gradient came from a fused op without
    autograd, whose second derivatives autograd's fallback left silently wrong; the Triton ops raised."""
    def t(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float64, requires_grad=True)
    x, w, b, r = t(1, 2, 3, 3), t(2, 2, 2, 2), t(2), t(1, 2, 2, 2)  # small: Triton's interpreter runs each perturbation
    a, other = t(2, 3), t(2, 3)
    with cnnkernels.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda *p: cnnkernels.conv2d_relu(*p, padding=(0, 1), stride=(1, 2)),
                                            (x, w, b))
        assert torch.autograd.gradgradcheck(lambda *p: cnnkernels.conv2d_add_relu(p[0], p[1], p[3], p[2]), (x, w, b, r))
        assert torch.autograd.gradgradcheck(lambda *p: cnnkernels.conv2d_relu(*p), (x, w))  # no bias
        assert torch.autograd.gradgradcheck(cnnkernels.add_relu, (a, other))


# --- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "cuda", "torch"])  # Triton under the CPU interpreter cannot trace
def test_torch_compile_fullgraph_forward_backward_and_dynamic_shapes(backend, recwarn):
    import torch._dynamo.testing

    def block(x, w, b, r):
        y = cnnkernels.conv2d_relu(x, w, b, padding=1)
        return cnnkernels.conv2d_add_relu(y, w, r, b, padding=1), cnnkernels.add_relu(y, r)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=counter)
    torch._dynamo.reset()
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with cnnkernels.use_backend(backend):
        for size in (8, 11):
            x = torch.randn(2, 4, size, size).contiguous(memory_format=torch.channels_last)
            r = torch.randn(2, 4, size, size)
            outs = compiled(x, w, b, r)
            expected = block(x, w, b, r)
            for out, ref in zip(outs, expected):
                assert torch.allclose(out, ref, atol=1e-5) and out.stride() == ref.stride()
            grads = torch.autograd.grad(sum(o.sum() for o in outs), (w, b))
            ref_grads = torch.autograd.grad(sum(o.sum() for o in expected), (w, b))
            assert all(torch.allclose(g, rg, atol=1e-4) for g, rg in zip(grads, ref_grads))
    assert counter.frame_count == 1  # one graph, reused for the second input size

    module = cnnkernels.nn.Conv2dReLU(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 9, 9)
    with cnnkernels.use_backend(backend):
        compiled_module = torch.compile(module, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled_module(x), module(x), atol=1e-6)
    # Dynamo warns about what it meets in our Python code (e.g. lru_cache-wrapped calls, which
    # backend choice under "auto" made once); a user compiling a model should see none of it.
    dynamo_warnings = [str(w.message) for w in recwarn if "_dynamo" in w.filename]
    assert not dynamo_warnings


@pytest.mark.parametrize("device, backend", [("cpu", "auto")] + [
    pytest.param("cuda", name, marks=pytest.mark.gpu) for name in ("auto", "cuda", "triton")])
def test_torch_compile_fullgraph_as_a_fresh_process_first_call(device, backend):
    """Backend choice made for the first time while dynamo traces: nothing on that path may read
    a file or do what dynamo cannot trace (the auto_choice table once did)."""
    done = _python(
        "import torch, cnnkernels, torch.nn.functional as F\n"
        f"cnnkernels.set_backend({backend!r})\n"
        f"x, w, r = (torch.randn(s, device={device!r}) for s in ((2, 8, 6, 6), (8, 8, 3, 3), (2, 8, 6, 6)))\n"
        "def block(x, w, r):\n"
        "    y = cnnkernels.conv2d_relu(x, w, None, padding=1)\n"
        "    return cnnkernels.add_relu(cnnkernels.conv2d_add_relu(y, w, r, None, padding=1), r)\n"
        "out = torch.compile(block, fullgraph=True, backend='aot_eager')(x, w, r)\n"
        "ref = torch.relu(torch.relu(F.conv2d(torch.relu(F.conv2d(x, w, None, padding=1)), w, None, padding=1) + r) + r)\n"
        "assert torch.allclose(out, ref, rtol=1e-2, atol=1e-2), (out - ref).abs().max()  # TF32 on GPUs\n"
        "print('ok')")
    assert done.stdout.strip() == "ok", done.stderr[-3000:]


def test_compile_cache_reuses_graphs_of_this_install_and_never_of_another(tmp_path):
    """torch.compile's on-disk caches know our ops by name only, so a graph whose backward was
    traced through another build's autograd would be reused (pytorch/pytorch#144344). Our import
    tags the cache key with this install's code: a second process hits the cache, a copy of the
    package with one line changed misses it, and a tag the user set stays in the key."""
    import json
    import shutil
    script = (
        "import json, torch, cnnkernels\n"
        "from torch._dynamo.utils import counters\n"
        "x, w, b = (torch.randn(s, requires_grad=True) for s in ((2, 4, 8, 8), (6, 4, 3, 3), (6,)))\n"
        "torch.compile(lambda x, w, b: cnnkernels.conv2d_relu(x, w, b, padding=1), fullgraph=True)(x, w, b).sum().backward()\n"
        "print(json.dumps([cnnkernels.__file__, torch.compiler.config.cache_key_tag, dict(counters['aot_autograd'])]))")

    def compile_in_a_fresh_process(package_parent=None, **env):
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
        if package_parent:
            env["PYTHONPATH"] = str(package_parent)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    _, tag, first = compile_in_a_fresh_process()
    _, same_tag, second = compile_in_a_fresh_process()
    assert tag.startswith("cnnkernels-") and same_tag == tag
    assert first.get("autograd_cache_miss") == 1 and second.get("autograd_cache_hit") == 1

    copy = tmp_path / "changed" / "cnnkernels"
    shutil.copytree(os.path.dirname(cnnkernels.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "reference.py", "a") as f:
        f.write("# a change that reaches no graph\n")
    path, changed_tag, changed = compile_in_a_fresh_process(tmp_path / "changed")
    assert path == str(copy / "__init__.py")
    assert changed_tag != tag and changed.get("autograd_cache_miss") == 1

    _, user_tag, _ = compile_in_a_fresh_process(TORCH_COMPILE_CACHE_KEY_TAG="mine")
    assert user_tag == f"mine+{tag}"


# --- torch.fx -------------------------------------------------------------------------------------

def test_torch_fx_records_each_call_as_one_node():
    """As for torch.nn.functional: symbolic_trace records the public functions (called directly or
    by the modules) as call_function nodes, and the GraphModule computes what the model does."""
    import torch.fx

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = cnnkernels.nn.Conv2dReLU(4, 4, 3, padding=1, padding_mode="reflect")
            self.conv_add = cnnkernels.nn.Conv2dAddReLU(4, 4, 3, padding=1)
            self.add = cnnkernels.nn.AddReLU()
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))

        def forward(self, x):
            y = self.conv(x)
            z = cnnkernels.conv2d_add_relu(self.conv_add(y, x), self.w, y)
            return self.add(z, cnnkernels.conv2d_relu(y, self.w, None, stride=1))

    model = Model()
    traced = torch.fx.symbolic_trace(model)
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    for function in (cnnkernels.conv2d_relu, cnnkernels.conv2d_add_relu, cnnkernels.add_relu):
        assert function in targets
    for batch in (2, 3):
        x = torch.randn(batch, 4, 8, 8)
        # Not bitwise: traced, Conv2dAddReLU takes its unfused path (it cannot check a Proxy's shape).
        assert torch.allclose(traced(x), model(x), atol=1e-5)


# --- torch.export ---------------------------------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])  # strict: traced by dynamo
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_records_the_ops_and_the_saved_program_runs_other_batch_sizes(backend, strict):
    """The deployment path: torch.export with a dynamic batch, torch.export.save and load. The
    program calls the chosen backend's ops (the torch backend's are plain aten ops) and computes,
    at a batch size it was not traced with, what the model does, in the same memory format."""
    import io

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = cnnkernels.nn.Conv2dReLU(3, 8, 3, padding=1)
            self.conv_add = cnnkernels.nn.Conv2dAddReLU(8, 8, 3, padding=1)
            self.add = cnnkernels.nn.AddReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.add(self.conv_add(y, y), y)

    model = Model().eval()
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    with cnnkernels.use_backend(backend):
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}},
                                      strict=strict)
        ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert all(op.startswith("aten.") for op in ops) if backend == "torch" else \
            len(ops) == 3 and all(op.startswith("cnnkernels.") for op in ops), ops
        saved = io.BytesIO()
        torch.export.save(program, saved)
        saved.seek(0)
        loaded = torch.export.load(saved)
        x = torch.randn(5, 3, 12, 12).contiguous(memory_format=torch.channels_last)
        expected = model(x)
        for exported in (program, loaded):
            out = exported.module()(x)
            assert torch.equal(out, expected) and out.stride() == expected.stride()


def test_aot_inductor_package_calls_the_cpp_ops(tmp_path):
    """AOTInductor, the C++ deployment path, compiles an exported model into a package whose
    generated code calls our C++ ops (registered by importing cnnkernels before loading it)."""
    model = nn.Sequential(cnnkernels.nn.Conv2dReLU(3, 8, 3, padding=1), cnnkernels.nn.Conv2dReLU(8, 8, 3, padding=1))
    model.eval().requires_grad_(False)
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    program = torch.export.export(model, (x,))
    assert {str(n.target) for n in program.graph.nodes if n.op == "call_function"} == {"cnnkernels.conv2d_relu.default"}
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    out = torch._inductor.aoti_load_package(package)(x)
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_conv_sees_every_weight_write(dtype):
    """The C++ CPU conv caches weights reordered for oneDNN; each write must still be seen,
    including writes through .data, which bump no version counter. (Big enough not to be a tiny
    conv, which does not use oneDNN; too few channels for Winograd.)"""
    from cnnkernels import _extension
    tiny_runs = _extension.require().cpu_tiny_conv_runs()
    x = torch.randn(8, 8, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 8, 3, 3, dtype=dtype), torch.randn(16, dtype=dtype)

    def check():
        out = torch.ops.cnnkernels.conv2d_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1)
        assert torch.allclose(out.float(), F.conv2d(x, w, b, padding=1).relu().float(), atol=1e-2, rtol=1e-2)
        return out

    first = check()
    assert torch.equal(check(), first)  # served from the cache, same result
    w.data[3].mul_(-2)
    assert not torch.equal(check(), first)
    with torch.no_grad():
        w.copy_(torch.randn_like(w))
    check()
    check()
    assert _extension.require().cpu_tiny_conv_runs() == tiny_runs


def _one_ulp_up(w):
    w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf"), dtype=w.dtype))


def _swap_two(w):
    w.view(-1)[[7, 500]] = w.view(-1)[[500, 7]].clone()


def _negate_two(w):
    w.view(-1)[[3, 700]] *= -1


def _copy_one_onto_another(w):
    w.view(-1)[9] = w.view(-1)[10]


def _last_element(w):
    w.view(-1)[-1] += 1


@pytest.mark.parametrize("change", [_one_ulp_up, _swap_two, _negate_two, _copy_one_onto_another, _last_element])
@pytest.mark.parametrize("layout", ["dense", "view_at_odd_offset"])
def test_cpu_conv_sees_small_weight_writes_through_data(change, layout):
    """The cached oneDNN weight is checked by a fingerprint of the weight's bytes: the smallest
    and most structured writes through .data (no version bump) must still reach the result,
    bit for bit as a fresh weight tensor with those values gives it. 13x9x3x3 fp32: 4,212 bytes,
    not a whole number of 8-byte words."""
    x = torch.randn(8, 9, 16, 16).contiguous(memory_format=torch.channels_last)
    storage = torch.randn(13 * 9 * 9 + 1)
    w = (storage[1:] if layout == "view_at_odd_offset" else storage[:-1]).view(13, 9, 3, 3)
    b = torch.randn(13)

    def conv(weight):
        return torch.ops.cnnkernels.conv2d_relu(x, weight, b, [1, 1], [1, 1], [1, 1], 1)
    before = conv(w)
    assert torch.equal(conv(w), before)  # from the cache
    change(w.data)
    fresh = conv(w.clone())  # a new tensor: no cache entry
    assert not torch.equal(fresh, before)  # the change shows in the output at all
    assert torch.equal(conv(w), fresh)
    assert torch.equal(conv(w), fresh)  # the next call, cached again from the changed weight


# --- autocast -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "torch", "auto"])
def test_autocast_runs_the_conv_in_autocast_dtype_like_f_conv2d(backend, device):
    dtype = torch.bfloat16
    x, w, b = (t.to(device) for t in _conv_inputs())
    with torch.autocast(device, dtype=dtype), cnnkernels.use_backend(backend):
        expected = torch.relu(F.conv2d(x, w, b, padding=1))
        out = cnnkernels.conv2d_relu(x, w, b, padding=1)
        assert out.dtype == expected.dtype == dtype
        assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
        assert cnnkernels.nn.Conv2dReLU(4, 6, 3).to(device)(x).dtype == dtype
        for residual in (torch.randn(2, 6, 8, 8, device=device), torch.randn(2, 6, 8, 8, device=device, dtype=dtype)):
            expected = torch.relu(F.conv2d(x, w, b, padding=1) + residual)
            out = cnnkernels.conv2d_add_relu(x, w, residual, b, padding=1)
            assert out.dtype == expected.dtype  # float32 when the residual is: eager promotes
            assert torch.allclose(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
        with pytest.raises(RuntimeError, match="expected residual of size"):
            cnnkernels.conv2d_add_relu(x, w, torch.randn(2, 6, 8, 7, device=device), b, padding=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "torch", "auto"])
def test_autocast_leaves_float64_operands_as_f_conv2d_does(backend, device):
    """Autocast casts only fp32 (and 16-bit) operands: a float64 conv runs in float64 under it."""
    x, w, b = (t.to(device, torch.float64) for t in _conv_inputs())
    residual = torch.randn(2, 6, 8, 8, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16), cnnkernels.use_backend(backend):
        expected = F.conv2d(x, w, b, padding=1)
        assert expected.dtype == torch.float64
        out = cnnkernels.conv2d_relu(x, w, b, padding=1)
        out_res = cnnkernels.conv2d_add_relu(x, w, residual, b, padding=1)
    assert out.dtype == out_res.dtype == torch.float64
    assert torch.allclose(out, torch.relu(expected), rtol=1e-12, atol=1e-12)
    assert torch.allclose(out_res, torch.relu(expected + residual), rtol=1e-12, atol=1e-12)
