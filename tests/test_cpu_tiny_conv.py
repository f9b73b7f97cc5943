"""The CPU tiny-conv path of the C++ backend (csrc/cpu/conv2d_relu.cpp, tiny_conv): fp32 convs of
at most 1e6 multiply-adds, without groups or dilation, run ATen's im2col + GEMM kernel instead of
oneDNN. Each test checks the result against float64 (check_conv: poisoned outputs, memory format,
inputs unchanged) and, through the extension's run counter, which path ran."""
import pytest
import torch

import cnnkernels
from cnnkernels import _extension
from conftest import cpu_conv_runs_in_fp32
from test_ops import check_conv, in_layout, seeded

BACKENDS = ["cuda", "auto"]  # the C++ backend on CPU tensors, and what auto picks for fp32


def tiny_runs():
    return _extension.require().cpu_tiny_conv_runs()


def laid_out(t, layout):
    """in_layout, plus "channels_last_strides": channels_last strides even where a size-1 dimension
    lets .contiguous(memory_format=torch.channels_last) keep NCHW ones (.to(memory_format=) gives
    these: a model's one-channel input and first conv's weight)."""
    if layout == "channels_last_strides":
        return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)
    return in_layout(t, layout)


def run(backend, n, c, k, h, w, kernel, geometry, layout="channels_last", residual=False, dtype=torch.float32,
        expect_tiny=True):
    seeded()
    x = laid_out(torch.randn(n, c, h, w), layout).to(dtype)
    weight = (torch.randn(k, c // geometry.get("groups", 1), *kernel) / (c * kernel[0] * kernel[1]) ** 0.5).to(dtype)
    if layout == "channels_last_strides":
        weight = laid_out(weight, layout)
    bias = torch.randn(k).to(dtype)
    full = dict(stride=1, padding=0, dilation=1, groups=1) | geometry
    res = None
    if residual:
        ref = torch.nn.functional.conv2d(x.float(), weight.float(), None, **full)
        res = laid_out(torch.randn(ref.shape), layout).to(dtype)
    before = tiny_runs()
    check_conv(backend, "conv2d_add_relu" if residual else "conv2d_relu", x, weight, bias, full, res)
    assert tiny_runs() - before == int(expect_tiny)


# (N, C, K, H, W, kernel, geometry): what each case exercises
TINY = {
    "lenet5_conv1": (1, 1, 6, 32, 32, (5, 5), {}),
    "lenet5_conv2_batch4": (4, 6, 16, 14, 14, (5, 5), {}),
    "non_square_strided_padded": (2, 3, 5, 11, 9, (3, 5), dict(stride=(2, 1), padding=(1, 2))),
    "one_by_one_odd_channels": (3, 7, 9, 6, 5, (1, 1), {}),
    "exactly_1e6_multiply_adds": (1, 10, 10, 100, 100, (1, 1), {}),
    "stride_past_the_kernel": (1, 3, 4, 5, 5, (2, 2), dict(stride=3, padding=2)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_strides", "nchw", "sliced"])
@pytest.mark.parametrize("case", TINY)
def test_tiny_fp32_convs_take_aten_im2col_gemm(case, layout, backend):
    n, c, k, h, w, kernel, geometry = TINY[case]
    run(backend, n, c, k, h, w, kernel, geometry, layout=layout)
    run(backend, n, c, k, h, w, kernel, geometry, layout=layout, residual=True)


# Just above the threshold, so that fp32 geometry and layouts keep their coverage of the other path
ABOVE = {
    "non_square_strided_padded": (4, 8, 16, 20, 20, (3, 5), dict(stride=(2, 1), padding=(1, 2))),
    "one_by_one_odd_channels": (4, 17, 33, 24, 24, (1, 1), {}),
}


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("case", ABOVE)
def test_fp32_convs_above_the_threshold_do_not(case, layout):
    n, c, k, h, w, kernel, geometry = ABOVE[case]
    run("cuda", n, c, k, h, w, kernel, geometry, layout=layout, expect_tiny=False)
    run("cuda", n, c, k, h, w, kernel, geometry, layout=layout, residual=True, expect_tiny=False)


@pytest.mark.parametrize("case", [
    dict(dilation=2), dict(groups=2), dict(over_1e6=True), dict(empty_batch=True),
])
def test_other_convs_do_not(case):
    if case.get("over_1e6"):  # one more row of output pixels than exactly_1e6_multiply_adds
        run("cuda", 1, 10, 10, 101, 100, (1, 1), {}, expect_tiny=False)
        return
    if case.get("empty_batch"):  # nothing to compute: no kernel runs
        for layout in ("channels_last", "nchw"):
            run("cuda", 0, 3, 4, 7, 7, (3, 3), dict(padding=1), layout=layout, expect_tiny=False)
            run("cuda", 0, 3, 4, 7, 7, (3, 3), dict(padding=1), layout=layout, residual=True, expect_tiny=False)
        return
    geometry = {key: case[key] for key in ("dilation", "groups") if key in case}
    run("cuda", 2, 4, 6, 12, 12, (3, 3), geometry | dict(padding=1), dtype=case.get("dtype", torch.float32),
        expect_tiny=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_convs_only_where_they_run_in_fp32(dtype):
    """16-bit convs that run in fp32 on this CPU (oneDNN lacks the dtype) take the tiny path as fp32
    ones do, rounded once; those oneDNN takes natively do not."""
    run("cuda", 2, 4, 6, 12, 12, (3, 3), dict(padding=1), dtype=dtype, expect_tiny=cpu_conv_runs_in_fp32(dtype))


def test_nan_propagates_through_the_tiny_path():
    x, weight, bias = torch.randn(1, 1, 32, 32), torch.randn(6, 1, 5, 5), torch.randn(6)
    x[0, 0, 7, 9] = float("nan")
    before = tiny_runs()
    out = torch.ops.cnnkernels.conv2d_relu(x, weight, bias, [1, 1], [0, 0], [1, 1], 1)
    assert tiny_runs() - before == 1
    expected = torch.nn.functional.conv2d(x, weight, bias).relu()
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
    assert torch.allclose(out.nan_to_num(0.0), expected.nan_to_num(0.0), atol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_strides", "nchw", "sliced"])
@pytest.mark.parametrize("case", ["lenet5_conv1", "lenet5_conv2_batch4", "non_square_strided_padded"])
def test_tiny_fp32_convs_backward_takes_aten_im2col_gemm(case, layout):
    """Input, weight, bias and residual gradients against float64, in the layouts PyTorch gives
    them, with the tiny backward run (the counter counts the forward and the backward)."""
    n, c, k, h, w, kernel, geometry = TINY[case]
    seeded()
    full = dict(stride=1, padding=0, dilation=1, groups=1) | geometry
    x = laid_out(torch.randn(n, c, h, w), layout).requires_grad_()
    weight = torch.randn(k, c, *kernel) / (c * kernel[0] * kernel[1]) ** 0.5
    weight = (laid_out(weight, layout) if layout == "channels_last_strides" else weight).requires_grad_()
    bias = torch.randn(k, requires_grad=True)
    residual = laid_out(torch.randn(torch.nn.functional.conv2d(x, weight, None, **full).shape), layout).requires_grad_()
    grad = torch.randn(residual.shape)
    before = tiny_runs()
    with cnnkernels.use_backend("cuda"):
        out = cnnkernels.conv2d_add_relu(x, weight, residual, bias, **full)
    ours = torch.autograd.grad(out, (x, weight, bias, residual), grad)
    assert tiny_runs() - before == 2
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias, residual)]
    ref_out = torch.relu(torch.nn.functional.conv2d(*ref_inputs[:3], **full) + ref_inputs[3])
    refs = torch.autograd.grad(ref_out, ref_inputs, grad.double())
    plain = [t.detach().requires_grad_() for t in (x, weight, bias, residual)]
    torch_grads = torch.autograd.grad(torch.relu(torch.nn.functional.conv2d(*plain[:3], **full) + plain[3]), plain, grad)
    for got, ref, theirs in zip(ours, refs, torch_grads):
        assert (got - ref).norm() <= 2 * (theirs.double() - ref).norm() + 1e-5 * ref.norm()
        assert got.stride() == theirs.stride(), (got.stride(), theirs.stride())


def test_double_backward_does_not_take_the_tiny_backward():
    """create_graph=True records the backward, which ATen's im2col + GEMM backward under our
    autograd would not: the gradient of the gradient must still be right."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    before = tiny_runs()
    out = torch.ops.cnnkernels.conv2d_relu(x, weight, None, [1, 1], [1, 1], [1, 1], 1)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    assert tiny_runs() - before == 1  # the forward only
    (ggw,) = torch.autograd.grad(gx.sum(), weight)
    x2, w2 = x.detach().requires_grad_(), weight.detach().requires_grad_()
    (gx2,) = torch.autograd.grad(torch.relu(torch.nn.functional.conv2d(x2, w2, None, 1, 1)).square().sum(), x2,
                                 create_graph=True)
    (ggw2,) = torch.autograd.grad(gx2.sum(), w2)
    assert torch.allclose(gx, gx2, atol=1e-4) and torch.allclose(ggw, ggw2, atol=1e-3, rtol=1e-3)
