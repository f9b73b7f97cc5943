"""The CPU Winograd path of the C++ backend (csrc/cpu/winograd.cpp): fp32 3x3 stride-1 convs
with at least 16 channels and enough output tiles, and 16-bit ones where they run in fp32. Each
test checks through the extension's run counter that the path it means to test ran (or did not)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import cnnkernels
from cnnkernels import _extension
from conftest import assert_matches_reference, counts_under_env, cpu_conv_runs_in_fp32, poisoned_outputs
from test_ops import check_conv, in_layout, reference, seeded

BACKENDS = ["cuda", "auto"]  # the C++ backend on CPU tensors, and what auto picks for fp32


@pytest.fixture(autouse=True)
def two_threads():
    """The tile rule depends on the thread count (16 tiles per thread): fix it at 2, which also
    splits the tiles between threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def winograd_runs():
    return _extension.require().cpu_winograd_runs()


def make(n, c, k, h, w, padding, layout="channels_last"):
    x = in_layout(torch.randn(n, c, h, w), layout)
    weight = torch.randn(k, c, 3, 3) / (9 * c) ** 0.5
    return x, weight, torch.randn(k), dict(stride=1, padding=padding, dilation=1, groups=1)


def run(backend, x, weight, bias, geometry, residual=None, expect_winograd=True):
    """check_conv (reference, poisoned outputs, memory format, inputs unchanged), and whether
    the Winograd path ran."""
    before = winograd_runs()
    out = check_conv(backend, "conv2d_add_relu" if residual is not None else "conv2d_relu",
                     x, weight, bias, geometry, residual)
    assert winograd_runs() - before == int(expect_winograd)
    return out


# (N, C, K, H, W, padding): what each case exercises
SHAPES = {
    # border tiles on every side, non-square, channel counts that leave 1 past 16 lanes
    "odd_sizes": (2, 17, 33, 21, 19, 1),
    "valid": (2, 16, 16, 18, 18, 0),
    "padding2": (1, 24, 20, 22, 22, 2),
    # 578 tiles: on 2 threads four blocks, the last 2 tiles short; on 1 or 3 threads three, the
    # last 1 short
    "several_blocks": (2, 64, 64, 68, 68, 1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, layout, backend):
    seeded()
    run(backend, *make(*SHAPES[shape], layout=layout))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_residual(layout, backend):
    seeded()
    x, weight, bias, geometry = make(2, 20, 24, 21, 19, 1, layout=layout)
    residual = in_layout(torch.randn(2, 24, 21, 19), "nchw" if layout == "channels_last" else "channels_last")
    run(backend, x, weight, bias, geometry, residual)


def test_residual_aliasing_the_input():
    seeded()
    x, weight, bias, geometry = make(2, 16, 16, 20, 20, 1)
    run("cuda", x, weight, bias, geometry, residual=x)


def test_without_bias():
    seeded()
    x, weight, _, geometry = make(2, 16, 32, 20, 20, 1)
    before = winograd_runs()
    with cnnkernels.use_backend("cuda"), poisoned_outputs():
        out = cnnkernels.conv2d_relu(x, weight, None, **geometry)
    assert winograd_runs() - before == 1
    no_bias = torch.zeros(32)
    assert_matches_reference(out, reference(x, weight, no_bias, geometry),
                             reference(x, weight, no_bias, geometry, dtype=torch.float32))


@pytest.mark.parametrize("shape", ["odd_sizes", "several_blocks"])
def test_gemms_through_at_bmm_where_onednn_is_switched_off(shape):
    """The 36 GEMMs run through oneDNN's matmul where it runs, else through at::bmm (MKL): with
    oneDNN switched off the result must be as right."""
    seeded()
    with torch.backends.mkldnn.flags(enabled=False):
        run("cuda", *make(*SHAPES[shape]))


@pytest.mark.parametrize("where", ["input_nan", "input_inf", "input_huge", "weight_nan"])
def test_values_the_transforms_cannot_take_go_to_the_direct_conv(where):
    """A NaN or infinity would spread over its whole 4x4 tile, and huge values could overflow:
    the result must still equal the direct conv's, NaN exactly where it puts NaN."""
    seeded()
    x, weight, bias, geometry = make(2, 16, 16, 20, 20, 1)
    if where == "weight_nan":
        weight[3, 2, 1, 1] = float("nan")
    else:
        x[1, 5, 9, 10] = {"input_nan": float("nan"), "input_inf": float("inf"), "input_huge": 1e30}[where]
    out = run("cuda", x, weight, bias, geometry, expect_winograd=False)
    if where in ("input_nan", "weight_nan"):
        assert out.isnan().any()
    elif where == "input_inf":
        assert out.isinf().any()


@pytest.mark.parametrize("size", [20, 24])
def test_a_weight_that_changes_between_calls(size):
    """An optimizer changes weights between calls: each result must use the weight as it is then.
    A changing weight is transformed anew only for convs of at least 1024 output pixels (24x24 at
    batch 2, not 20x20); the others run the direct conv until the weight stops changing."""
    seeded()
    x, weight, bias, geometry = make(2, 16, 16, size, size, 1)
    run("cuda", x, weight, bias, geometry)  # a new weight: transformed and cached
    for _ in range(2):
        weight.data.mul_(-0.5)  # bumps no version counter: the cache must compare the bytes
        run("cuda", x, weight, bias, geometry, expect_winograd=size == 24)
    run("cuda", x, weight, bias, geometry)  # unchanged since the last call: transformed again


@pytest.mark.parametrize("case", [
    dict(stride=2), dict(dilation=2), dict(groups=2), dict(channels=8), dict(kernel=5), dict(small=True),
])
def test_other_convs_take_the_direct_path(case):
    seeded()
    n, h = (1, 8) if case.get("small") else (2, 20)
    c = case.get("channels", 16)
    groups = case.get("groups", 1)
    kernel = case.get("kernel", 3)
    x = torch.randn(n, c, h, h)
    weight = torch.randn(16, c // groups, kernel, kernel) / (c * kernel * kernel) ** 0.5
    geometry = dict(stride=case.get("stride", 1), padding=kernel // 2, dilation=case.get("dilation", 1),
                    groups=groups)
    run("cuda", x, weight, torch.randn(16), geometry, expect_winograd=False)


SIXTEEN_BIT = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)


@SIXTEEN_BIT
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_16_bit_convs_take_winograd_where_they_run_in_fp32(dtype, layout):
    """Where this CPU's oneDNN lacks a 16-bit dtype its convs run in fp32 (ATen's 16-bit fallback
    is 8-40x slower), and Winograd takes them too, rounded once: the result in the input's dtype
    and memory format, within the tolerance rule. Elsewhere they keep oneDNN's native conv."""
    seeded()
    x, weight, bias, geometry = make(2, 17, 24, 21, 19, 1, layout=layout)
    residual = in_layout(torch.randn(2, 24, 21, 19), layout)
    out = run("cuda", x.to(dtype), weight.to(dtype), bias.to(dtype), geometry, residual.to(dtype),
              expect_winograd=cpu_conv_runs_in_fp32(dtype))
    assert out.dtype == dtype


def test_switched_off_by_environment():
    code = "\n".join([
        "import torch, cnnkernels",
        "from cnnkernels import _extension",
        "torch.set_num_threads(2)",
        "with cnnkernels.use_backend('cuda'):",
        "    cnnkernels.conv2d_relu(torch.randn(2, 16, 20, 20), torch.randn(16, 16, 3, 3), padding=1)",
        "print(_extension.module().cpu_winograd_runs())",
    ])
    assert counts_under_env(code, "CNNKERNELS_CPU_WINOGRAD", ("0", "1")) == {"0": 0, "1": 1}


def test_by_default_winograd_runs_where_it_measured_faster():
    """Without CNNKERNELS_CPU_WINOGRAD, each problem's first call times Winograd against the
    direct path (4 runs of each) and later calls take the faster, forward and input gradient
    alike, with every output right; deterministic mode keeps the geometric rule (one run)."""
    code = "\n".join([
        "import json, torch, cnnkernels",
        "from cnnkernels import _extension",
        "torch.set_num_threads(2)",
        "x = torch.randn(2, 16, 20, 20).contiguous(memory_format=torch.channels_last).requires_grad_()",
        "w = torch.randn(16, 16, 3, 3) / 12",
        "x64 = x.detach().double().requires_grad_()",
        "ref = torch.relu(torch.nn.functional.conv2d(x64, w.double(), padding=1))",
        "(ref_grad,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))",
        "runs, errors = [], []",
        "def call():",
        "    before = _extension.module().cpu_winograd_runs()",
        "    with cnnkernels.use_backend('cuda'):",
        "        out = cnnkernels.conv2d_relu(x, w, None, padding=1)",
        "        forward = _extension.module().cpu_winograd_runs() - before",
        "        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))",
        "    runs.append([forward, _extension.module().cpu_winograd_runs() - before - forward])",
        "    errors.append(max(((a - b).norm() / b.norm()).item() for a, b in ((out, ref), (grad, ref_grad))))",
        "for _ in range(4):",
        "    call()",
        "torch.use_deterministic_algorithms(True)",
        "call()",
        "print(json.dumps([runs, errors]))",
    ])
    env = {k: v for k, v in os.environ.items() if k != "CNNKERNELS_CPU_WINOGRAD"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs, errors = json.loads(result.stdout.split("\n")[-2])
    assert runs[0] == [4, 4]  # the first call times both ways, four runs each
    forward, input_grad = runs[1]
    assert forward in (0, 1) and input_grad in (0, 1) and runs[1:4] == [[forward, input_grad]] * 3
    assert runs[4] == [1, 1]
    assert max(errors) < 1e-5, errors


# --- the input gradient --------------------------------------------------------------------------
# The references below take the ReLU mask from our own output: an output within rounding of 0
# may round to either side, and a mask flipped there would change a gradient by a whole term.

def reference_grads(x, weight, geometry, grad_pre_relu, dtype):
    """Input, weight, bias and residual gradients of relu(conv(x, w) + b + r) for a given masked
    output gradient, through F.conv2d's autograd in `dtype`."""
    x_, w_ = (t.detach().to(dtype).requires_grad_() for t in (x, weight))
    g = grad_pre_relu.to(dtype)
    grad_x, grad_w = torch.autograd.grad(torch.nn.functional.conv2d(x_, w_, None, **geometry), (x_, w_), g)
    return [grad_x, grad_w, g.sum((0, 2, 3)), g]


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape", ["odd_sizes", "valid", "padding2"])
def test_input_gradient(shape, layout):
    """conv2d_add_relu's gradients when Winograd runs the forward and the input gradient: each
    within the tolerance rule of float64 autograd through F.conv2d."""
    seeded()
    x, weight, bias, geometry = make(*SHAPES[shape], layout=layout)
    out_shape = reference(x, weight, bias, geometry).shape
    residual, upstream = torch.randn(out_shape), torch.randn(out_shape)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    before = winograd_runs()
    with cnnkernels.use_backend("cuda"), poisoned_outputs():
        out = cnnkernels.conv2d_add_relu(leaves[0], leaves[1], leaves[3], leaves[2], **geometry)
        out.backward(upstream)
    assert winograd_runs() - before == 2  # the forward and the input gradient
    grad_pre_relu = upstream * (out.detach() > 0)
    expected = reference_grads(x, weight, geometry, grad_pre_relu, torch.float64)
    torch_fp32 = reference_grads(x, weight, geometry, grad_pre_relu, torch.float32)
    for name, leaf, e, t in zip(("input", "weight", "bias", "residual"), leaves, expected, torch_fp32):
        assert leaf.grad.shape == e.shape, name
        assert_matches_reference(leaf.grad, e, t)
    assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                        else torch.contiguous_format)


@SIXTEEN_BIT
def test_16_bit_input_gradient_where_they_run_in_fp32(dtype):
    """The input gradient of a 16-bit conv that runs in fp32 goes through Winograd as the forward
    does: every gradient in the dtype and within the tolerance rule of float64 autograd, PyTorch's
    own error taken from fp32 rounded to the dtype."""
    seeded()
    x, weight, bias, geometry = make(*SHAPES["odd_sizes"])
    out_shape = reference(x, weight, bias, geometry).shape
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    residual, upstream = torch.randn(out_shape).to(dtype), torch.randn(out_shape).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    before = winograd_runs()
    with cnnkernels.use_backend("cuda"), poisoned_outputs():
        out = cnnkernels.conv2d_add_relu(leaves[0], leaves[1], leaves[3], leaves[2], **geometry)
        out.backward(upstream)
    assert winograd_runs() - before == 2 * cpu_conv_runs_in_fp32(dtype)
    grad_pre_relu = upstream * (out.detach() > 0)
    expected = reference_grads(x, weight, geometry, grad_pre_relu, torch.float64)
    torch_16_bit = [g.to(dtype) for g in reference_grads(x, weight, geometry, grad_pre_relu, torch.float32)]
    for name, leaf, e, t in zip(("input", "weight", "bias", "residual"), leaves, expected, torch_16_bit):
        assert leaf.grad.dtype == dtype and leaf.grad.shape == e.shape, name
        assert_matches_reference(leaf.grad, e, t)


def test_double_backward_takes_the_differentiable_path():
    seeded()
    x, weight, bias, geometry = make(2, 16, 16, 20, 20, 1)
    x.requires_grad_()
    with cnnkernels.use_backend("cuda"):
        before = winograd_runs()
        out = cnnkernels.conv2d_relu(x, weight, bias, **geometry)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        assert winograd_runs() - before == 1  # the forward only
        (grad_grad_x,) = torch.autograd.grad(grad_x.square().sum(), x)
    mask = (out.detach() > 0).double()
    x64 = x.detach().double().requires_grad_()
    out64 = torch.nn.functional.conv2d(x64, weight.double(), bias.double(), **geometry) * mask
    (g64,) = torch.autograd.grad(out64.square().sum(), x64, create_graph=True)
    (gg64,) = torch.autograd.grad(g64.square().sum(), x64)
    torch.testing.assert_close(grad_grad_x.double(), gg64, rtol=1e-3, atol=1e-3 * gg64.abs().max().item())


def test_torch_compile_traces_the_backward_without_running_winograd_on_fake_tensors():
    seeded()
    x, weight, bias, geometry = make(2, 16, 16, 20, 20, 1)
    params = [t.clone().requires_grad_() for t in (x, weight, bias)]

    def step(x, w, b):
        return cnnkernels.conv2d_relu(x, w, b, **geometry).square().sum()

    with cnnkernels.use_backend("cuda"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        grads = torch.autograd.grad(compiled(*params), params)
        before = winograd_runs()
        expected = torch.autograd.grad(step(*params), params)
        assert winograd_runs() - before == 2
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


@pytest.mark.parametrize("threads", [1, 3])
def test_other_thread_counts(threads):
    """Blocks follow the thread count (SHAPES says how): the result must not."""
    seeded()
    x, weight, bias, geometry = make(*SHAPES["several_blocks"])
    torch.set_num_threads(threads)  # the autouse fixture restores it
    run("cuda", x, weight, bias, geometry)
