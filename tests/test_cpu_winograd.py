"""The CPU Winograd path of the C++ backend (csrc/cpu/winograd.cpp): fp32 3x3 stride-1 convs
with at least 16 channels and enough output tiles. Each test checks through the extension's
run counter that the path it means to test ran (or did not)."""
import os
import subprocess
import sys

import pytest
import torch

import cnnkernels
from cnnkernels import _extension
from conftest import assert_matches_reference, poisoned_outputs
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
    # 588 tiles: two full blocks of 256 on one thread and a short one on the other
    "several_blocks": (3, 64, 64, 56, 56, 1),
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


def test_a_changed_weight_is_transformed_again():
    seeded()
    x, weight, bias, geometry = make(2, 16, 16, 20, 20, 1)
    run("cuda", x, weight, bias, geometry)
    weight.data.mul_(-0.5)  # bumps no version counter: the cache must compare the bytes
    run("cuda", x, weight, bias, geometry)


@pytest.mark.parametrize("case", [
    dict(stride=2), dict(dilation=2), dict(groups=2), dict(channels=8), dict(dtype=torch.bfloat16),
    dict(kernel=5), dict(small=True),
])
def test_other_convs_take_the_direct_path(case):
    seeded()
    n, h = (1, 8) if case.get("small") else (2, 20)
    c = case.get("channels", 16)
    groups = case.get("groups", 1)
    kernel = case.get("kernel", 3)
    dtype = case.get("dtype", torch.float32)
    x = torch.randn(n, c, h, h).to(dtype)
    weight = (torch.randn(16, c // groups, kernel, kernel) / (c * kernel * kernel) ** 0.5).to(dtype)
    geometry = dict(stride=case.get("stride", 1), padding=kernel // 2, dilation=case.get("dilation", 1),
                    groups=groups)
    run("cuda", x, weight, torch.randn(16).to(dtype), geometry, expect_winograd=False)


def test_switched_off_by_environment():
    code = "\n".join([
        "import torch, cnnkernels",
        "from cnnkernels import _extension",
        "torch.set_num_threads(2)",
        "with cnnkernels.use_backend('cuda'):",
        "    cnnkernels.conv2d_relu(torch.randn(2, 16, 20, 20), torch.randn(16, 16, 3, 3), padding=1)",
        "print(_extension.module().cpu_winograd_runs())",
    ])
    runs = {}
    for value in ("0", "1"):
        env = dict(os.environ, CNNKERNELS_CPU_WINOGRAD=value)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        runs[value] = int(result.stdout.split()[-1])
    assert runs == {"0": 0, "1": 1}
