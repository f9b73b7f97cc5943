"""The fused backward: relu_backward_bias_grad's kernels, and what the ops' backward runs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cnnkernels
from cnnkernels._args import memory_format_of
from conftest import DEVICES, assert_matches_reference, interpreting_triton, place_values, poisoned_outputs

# (2, 3, 40, 40): several programs per image, the last one partly filled.
SHAPES = [(2, 5, 7, 9), (1, 67, 3, 3), (3, 1, 1, 1), (2, 3, 5, 1), (2, 130, 6, 6), (0, 4, 3, 3), (2, 3, 40, 40)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def fused_op(backend):
    if backend == "triton":
        import cnnkernels.triton_ops  # noqa: F401  registers the Triton ops
        return torch.ops.cnnkernels.relu_backward_bias_grad_triton
    return torch.ops.cnnkernels.relu_backward_bias_grad


def grad_and_output(shape, dtype, device, memory_format):
    def t():
        return torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    grad, output = t(), t()
    if grad.numel():
        output[0, 0, 0, 0] = float("nan")  # passes the gradient through, as threshold_backward does
        output[-1, -1, -1, -1], grad[-1, -1, -1, -1] = 1.0, float("nan")
    return grad, output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_backward_bias_grad_matches_reference(shape, dtype, memory_format, backend, device):
    if backend == "triton" and device == "cpu" and shape[1] == 130 and dtype != torch.float32:
        pytest.skip("the interpreter is slow: the wide case runs in float32 only")
    grad, output = grad_and_output(shape, dtype, device, memory_format)
    saved = grad.clone(), output.clone()
    with poisoned_outputs():
        grad_pre_relu, grad_bias = fused_op(backend)(grad, output)
    expected = torch.ops.aten.threshold_backward(grad, output, 0)
    assert torch.equal(grad_pre_relu.isnan(), expected.isnan())
    assert torch.equal(grad_pre_relu.nan_to_num(), expected.nan_to_num())
    fmt = memory_format_of(output)  # the output's format; contiguous for empty tensors
    assert grad_pre_relu.dtype == dtype and grad_pre_relu.is_contiguous(memory_format=fmt)
    assert grad_bias.shape == (shape[1],) and grad_bias.dtype == dtype
    assert_matches_reference(grad_bias, expected.double().sum((0, 2, 3)), expected.sum((0, 2, 3)))
    assert torch.equal(grad.nan_to_num(), saved[0].nan_to_num()) and torch.equal(output.nan_to_num(),
                                                                                 saved[1].nan_to_num())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_triton_relu_backward_with_4096_element_tiles(memory_format, monkeypatch):
    """The tile size benchmarks/bn_tiles.py may pick: several programs per image, two channel blocks."""
    if not interpreting_triton():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    from cnnkernels.triton_ops import relu_backward
    monkeypatch.setattr(relu_backward, "TILE_ELEMENTS", 4096)
    relu_backward._WALKS.clear()
    try:
        grad, output = grad_and_output((2, 130, 20, 20), torch.float32, "cpu", memory_format)
        with poisoned_outputs():
            grad_pre_relu, grad_bias = fused_op("triton")(grad, output)
    finally:
        relu_backward._WALKS.clear()
    expected = torch.ops.aten.threshold_backward(grad, output, 0)
    assert torch.equal(grad_pre_relu.nan_to_num(), expected.nan_to_num())
    assert_matches_reference(grad_bias, expected.double().sum((0, 2, 3)), expected.sum((0, 2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_relu_backward_bias_grad_takes_any_strides(backend, device):
    """A sliced grad and an output of the other memory format: the result takes output's format."""
    big = torch.randn(2, 9, 8, 11, device=device)
    grad = big[:, 1:6, :, 2:9]
    output = torch.randn(2, 5, 8, 7, device=device).contiguous(memory_format=torch.channels_last)
    grad_pre_relu, grad_bias = fused_op(backend)(grad, output)
    expected = torch.ops.aten.threshold_backward(grad, output, 0)
    assert torch.equal(grad_pre_relu, expected) and grad_pre_relu.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(grad_bias, expected.double().sum((0, 2, 3)), expected.sum((0, 2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bias_grad_is_the_same_bits_every_run(memory_format, backend, device):
    grad, output = grad_and_output((4, 24, 40, 40) if device == "cuda" else (2, 24, 12, 12), torch.float32,
                                   device, memory_format)
    grad[-1, -1, -1, -1] = 0.5
    first = fused_op(backend)(grad, output)[1]
    assert all(torch.equal(first, fused_op(backend)(grad, output)[1]) for _ in range(3))


@pytest.mark.parametrize("channels", [16, 6])  # 6: fewer than 16 channels take the periodic loop
def test_cpu_bias_grad_does_not_depend_on_the_thread_count(channels):
    grad, output = grad_and_output((8, channels, 30, 30), torch.float32, "cpu", torch.channels_last)
    grad[-1, -1, -1, -1] = 0.5
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.cnnkernels.relu_backward_bias_grad(grad, output)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_relu_backward_bias_grad_rejects_bad_input(backend):
    if backend == "triton" and not interpreting_triton():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    op = fused_op(backend)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="4-D"):
        op(x[0], x[0])
    with pytest.raises(RuntimeError, match="size|same size"):
        op(x, x[:, :2])
    with pytest.raises(RuntimeError, match="dtype"):
        op(x.double(), x)


def test_opcheck_relu_backward_bias_grad():
    for fmt in (torch.contiguous_format, torch.channels_last):
        for requires_grad in (False, True):
            grad, output = (torch.randn(2, 5, 4, 3, requires_grad=requires_grad).contiguous(memory_format=fmt)
                            for _ in range(2))
            torch.library.opcheck(torch.ops.cnnkernels.relu_backward_bias_grad.default, (grad, output))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_relu_backward_bias_grad_is_differentiable_in_grad(backend, device):
    """Its gradient in grad, which double backward through the conv ops takes; none in output."""
    grad = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    output = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    output[0, 0, 0, 0] = float("nan")  # passes the gradient through, as threshold_backward does
    assert torch.autograd.gradcheck(lambda g: fused_op(backend)(g, output), (grad,))
    output.requires_grad_()
    _, grad_bias = fused_op(backend)(grad, output)
    assert torch.autograd.grad(grad_bias.sum(), output, allow_unused=True)[0] is None


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_conv_backward_masks_and_sums_the_bias_in_one_fused_pass(backend, device):
    """With a bias: our relu_backward_bias_grad and no other mask or bias reduction; the residual's
    gradient is the masked gradient itself (the tensor given to the conv's backward:
    convolution_backward, or for this tiny fp32 conv on the CPU ATen's im2col + GEMM backward)."""
    def t(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)
    x, w, b, r = t(2, 3, 6, 6), t(4, 3, 3, 3), t(4), t(2, 4, 6, 6)
    residual_grads = []
    r.register_hook(residual_grads.append)
    with cnnkernels.use_backend(backend):
        out = cnnkernels.conv2d_add_relu(x, w, r, b, padding=1)
    log = OpLog()
    with log:
        out.backward(torch.randn_like(out))
    names = [name for name, _ in log.calls]
    suffix = "_triton" if backend == "triton" else ""
    assert names.count(f"cnnkernels.relu_backward_bias_grad{suffix}") == 1, names
    assert "aten.threshold_backward" not in names and "aten.sum" not in names, names
    conv_backward = {"aten.convolution_backward", "aten._slow_conv2d_backward"}
    (conv_args,) = [args for name, args in log.calls if name in conv_backward]
    assert conv_args[-1] == [True, True, False]  # the bias gradient is already done
    assert residual_grads[0].data_ptr() == conv_args[0].data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_conv_backward_without_bias_masks_with_aten(backend, device):
    x = torch.randn(1, 2, 5, 5, device=device, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, device=device, requires_grad=True)
    with cnnkernels.use_backend(backend):
        out = cnnkernels.conv2d_relu(x, w)
    log = OpLog()
    with log:
        out.sum().backward()
    names = [name for name, _ in log.calls]
    assert "aten.threshold_backward" in names and not any("relu_backward_bias_grad" in n for n in names), names


# bf16 convs whose gradients aten.convolution_backward (oneDNN, torch 2.14.1 and 2.11.0 on an AVX-512
# BF16 CPU) got wrong, found by random searches against float64: each fails with the `torch` backend
# (the uninitialized values in 1-8 of 8 seeds, the NaN cases in all). The C++ ops' backward runs them
# in fp32.
# (N, C, H, W, K, kernel, stride, padding, dilation, groups, layout, non-finite input values,
# non-finite gradient values)
ONEDNN_BF16_BACKWARD_CASES = {
    # channels_last, one or two output columns, column stride above 1: uninitialized weight gradients
    "one_column": (3, 5, 4, 1, 6, (2, 3), (1, 2), 1, (2, 1), 1, "channels_last", [], []),
    "two_columns_groups2": (3, 12, 5, 1, 10, (1, 3), (1, 2), (0, 2), 1, 2, "channels_last", [], []),
    "one_column_s2": (1, 5, 5, 1, 6, (3, 3), 2, (0, 2), 1, 1, "channels_last", [], []),
    # NaN in the input: NaN misplaced in the weight gradient
    "nan_input_groups3": (1, 6, 6, 2, 15, (1, 3), (1, 2), (0, 1), 1, 3, "channels_last", ["nan", "nan"], []),
    "nan_input_dilated": (2, 2, 9, 7, 5, (2, 5), 1, (1, 0), (2, 1), 1, "channels_last", ["nan", "nan"], []),
    "nan_input_s2": (1, 2, 12, 11, 6, (5, 5), (2, 1), (1, 0), (1, 2), 1, "channels_last", ["nan", "nan"], []),
    # NaN in the gradient: NaN misplaced in the input gradient
    "nan_grad_groups3": (2, 12, 12, 9, 3, (2, 5), 1, 0, (2, 1), 3, "channels_last", [], ["nan", "nan"]),
    "nan_grad_s2": (3, 4, 7, 4, 2, (2, 1), (2, 1), 0, (1, 2), 2, "channels_last", [], ["nan", "nan"]),
    "nan_grad_nchw_depthwise": (3, 6, 10, 6, 6, (1, 1), (1, 3), (0, 2), (2, 1), 6, "nchw", [], ["nan", "nan"]),
    "nan_grad_nchw_1_output_channel": (2, 6, 12, 9, 1, (1, 2), (2, 1), 0, 1, 1, "nchw", [], ["nan", "nan"]),
}


def bf16_conv_gradients(case, backend, device, ours=cnnkernels.conv2d_add_relu):
    """Our gradients (input, weight, bias, residual) of conv2d_add_relu (or `ours`) in bf16 for one
    ONEDNN_BF16_BACKWARD_CASES case, with PyTorch's in float64 and in fp32 rounded to bf16."""
    n, c, h, w, k, (r, s), stride, padding, dilation, groups, layout, x_values, grad_values = \
        ONEDNN_BF16_BACKWARD_CASES[case]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = place_values(torch.randn(n, c, h, w, device=device), x_values).bfloat16()
    x = x.contiguous(memory_format=memory_format)
    weight = (torch.randn(k, c // groups, r, s, device=device) / (c // groups * r * s) ** 0.5).bfloat16()
    bias = torch.randn(k, device=device).bfloat16()
    out_shape = torch.nn.functional.conv2d(x.float(), weight.float(), None, **geometry).shape
    # every output above 0, so that the ReLU passes the whole gradient on, NaN included
    residual = (8 + torch.randn(out_shape, device=device)).bfloat16().contiguous(memory_format=memory_format)
    grad = place_values(torch.randn(out_shape, device=device), grad_values, first_row=0).bfloat16()

    def gradients(conv2d_add_relu, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias, residual)]
        conv2d_add_relu(leaves[0], leaves[1], leaves[3], leaves[2], **geometry).backward(
            grad.to(dtype).contiguous(memory_format=memory_format))
        return [t.grad for t in leaves]

    with cnnkernels.use_backend(backend), poisoned_outputs():
        ours_bf16 = gradients(ours, torch.bfloat16)
    with cnnkernels.use_backend("torch"):
        ref = gradients(cnnkernels.conv2d_add_relu, torch.float64)
        torch_bf16 = [g.bfloat16() for g in gradients(cnnkernels.conv2d_add_relu, torch.float32)]
    return ours_bf16, ref, torch_bf16


def assert_gradients_match(ours, ref, torch_bf16):
    for name, g, g64, g_bf16 in zip(("input", "weight", "bias", "residual"), ours, ref, torch_bf16):
        try:
            assert_matches_reference(g, g64, g_bf16)
        except AssertionError as e:
            raise AssertionError(f"{name} gradient: {e}") from None


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_fp16_conv_gradients_on_the_cpu(backend):
    """fp16 convs run in fp32 where PyTorch's oneDNN lacks fp16 (ATen's fp16 fallback is 20-40x
    slower), rounded once, in the backward too: every gradient in fp16 and within the tolerance
    rule of float64, PyTorch's own error taken from fp32 rounded to fp16."""
    torch.manual_seed(0)
    geometry = dict(stride=1, padding=1, dilation=1, groups=1)
    channels_last = dict(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 7, 7).half().contiguous(**channels_last)
    weight, bias = (torch.randn(6, 8, 3, 3) / 72 ** 0.5).half(), torch.randn(6).half()
    residual = torch.randn(2, 6, 7, 7).half().contiguous(**channels_last)
    grad = torch.randn(2, 6, 7, 7).half().contiguous(**channels_last)

    def gradients(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias, residual)]
        cnnkernels.conv2d_add_relu(leaves[0], leaves[1], leaves[3], leaves[2], **geometry).backward(grad.to(dtype))
        return [t.grad for t in leaves]

    with cnnkernels.use_backend(backend), poisoned_outputs():
        ours = gradients(torch.float16)
    with cnnkernels.use_backend("torch"):
        ref, torch_fp16 = gradients(torch.float64), [g.half() for g in gradients(torch.float32)]
    assert all(g.dtype == torch.float16 for g in ours)
    assert_gradients_match(ours, ref, torch_fp16)


# The Triton ops' backward calls aten.convolution_backward as it is; on CPU tensors they run only in
# Triton's interpreter, for testing.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("device,backend", [("cpu", "cuda"), ("cpu", "auto")] + [
    pytest.param("cuda", b, marks=pytest.mark.gpu) for b in ("cuda", "triton", "auto")])
@pytest.mark.parametrize("case", ONEDNN_BF16_BACKWARD_CASES)
def test_bf16_conv_gradients_onednn_got_wrong(case, backend, device):
    assert_gradients_match(*bf16_conv_gradients(case, backend, device))


# torch.compile traces the backward with fake tensors, whose values cannot be checked for NaN: there
# only the cases known from the shapes run in fp32 (the NaN ones get PyTorch's compiled backward).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bf16_conv_gradients_onednn_got_wrong_under_torch_compile():
    torch._dynamo.reset()
    compiled = torch.compile(cnnkernels.conv2d_add_relu, fullgraph=True)
    assert_gradients_match(*bf16_conv_gradients("two_columns_groups2", "cuda", "cpu", ours=compiled))


# --- differentiation our kernels lack: torch.func transforms and forward-mode AD ---------------------

def _forward_ad_tangent(fn, primal, tangent):
    import torch.autograd.forward_ad as forward_ad
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(fn(forward_ad.make_dual(primal, tangent))).tangent


DIFFERENTIATIONS = {  # name: (how, with the op as f(w) and its reference ref(w) -> a value to compare)
    "torch.func.grad": lambda f, w: torch.func.grad(lambda v: f(v).square().sum())(w),
    "torch.func.jvp": lambda f, w: torch.func.jvp(f, (w,), (torch.ones_like(w),))[1],
    "torch.func.vmap": lambda f, w: torch.func.vmap(f)(torch.stack([w, 2 * w])),
    "forward-mode AD": lambda f, w: _forward_ad_tangent(f, w, torch.ones_like(w)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", DIFFERENTIATIONS)
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton", "torch"])
def test_differentiation_without_our_rules_falls_back_under_auto_and_raises_on_our_backends(backend, how, device):
    """Before, forward-mode AD through the Triton ops dropped the tangent (None, or zeros under
    torch.func.jvp) and the C++ ops raised torch's own errors. Now "auto" runs such calls on the
    reference, whose results match F.conv2d's, and the cuda and triton backends refuse them."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, device=device)
    b = torch.randn(3, dtype=torch.float64, device=device)
    cases = [(lambda v: cnnkernels.conv2d_relu(x, v, b), lambda v: torch.relu(torch.nn.functional.conv2d(x, v, b))),
             (lambda v: cnnkernels.add_relu(v, v.flip(0)), lambda v: torch.relu(v + v.flip(0)))]
    differentiate = DIFFERENTIATIONS[how]
    with cnnkernels.use_backend(backend):
        for f, ref in cases:
            f(w)  # a plain call first leaves a call plan: the differentiated call must not take it
            if backend in ("cuda", "triton"):
                with pytest.raises(NotImplementedError, match="torch.func transforms|forward-mode AD"):
                    differentiate(f, w)
            else:
                got, expected = differentiate(f, w), differentiate(ref, w)
                assert got is not None and torch.allclose(got, expected)
