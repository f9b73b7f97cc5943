"""Every op on every backend against a float64 PyTorch reference, over the geometry grid."""
import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cnnkernels
from conftest import (BACKENDS, DEVICES, assert_matches_reference, conv_output_memory_format, memory_format_of,
                      place_values, poisoned_outputs)

# (N, C, H, W, K, kernel, stride, padding, dilation, groups)
CASES = {
    "1x1": (2, 5, 6, 7, 3, (1, 1), 1, 0, 1, 1),
    "3x3": (2, 3, 8, 8, 7, (3, 3), 1, 1, 1, 1),
    "5x5_s2": (1, 4, 11, 9, 6, (5, 5), 2, 2, 1, 1),
    "7x7_s2_stem": (1, 3, 15, 13, 5, (7, 7), 2, 3, 1, 1),
    "11x11_s4": (1, 3, 23, 23, 4, (11, 11), 4, 2, 1, 1),
    "3x1": (2, 4, 7, 6, 5, (3, 1), 1, (1, 0), 1, 1),
    "1x5_s12": (1, 3, 6, 10, 4, (1, 5), (1, 2), (0, 2), 1, 1),
    "3x3_s4": (1, 3, 13, 13, 5, (3, 3), 4, 1, 1, 1),
    "dilation2": (1, 4, 9, 9, 4, (3, 3), 1, 2, 2, 1),
    "groups2": (2, 6, 7, 7, 4, (3, 3), 1, 1, 1, 2),
    "depthwise": (1, 5, 8, 8, 5, (3, 3), 1, 1, 1, 5),
    "same_even": (1, 3, 7, 6, 4, (4, 2), 1, "same", 1, 1),
    "valid_s2": (1, 3, 9, 9, 3, (3, 3), 2, "valid", 1, 1),
    "odd_channels_s2": (1, 7, 9, 9, 9, (3, 3), 2, 1, 1, 1),
}
LAYOUTS = ["nchw", "channels_last", "sliced"]
DTYPES = [torch.float32, torch.bfloat16]


def seeded():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"seed {seed}")


def in_layout(t, layout):
    """`t`'s values as an NCHW, channels_last or sliced (non-contiguous) tensor."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    big = torch.full((n, c + 3, h + 1, w + 2), float("nan"), dtype=t.dtype, device=t.device)
    big = big.contiguous(memory_format=torch.channels_last)
    view = big[:, 1:c + 1, :h, 2:]
    view.copy_(t)
    return view


def make_conv(case, dtype, device, layout):
    n, c, h, w, k, (r, s), stride, padding, dilation, groups = CASES[case]
    x = in_layout(torch.randn(n, c, h, w, device=device).to(dtype), layout)
    weight = torch.randn(k, c // groups, r, s, device=device).div_((c // groups * r * s) ** 0.5).to(dtype)
    bias = torch.randn(k, device=device).to(dtype)
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def reference(x, weight, bias, geometry, residual=None, dtype=torch.float64):
    out = F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), **geometry)
    if residual is not None:
        out = out + residual.to(dtype)
    return torch.relu(out)


def check_conv(backend, op, x, weight, bias, geometry, residual=None):
    operands = [t for t in (x, weight, bias, residual) if t is not None]
    inputs = [t.clone() for t in operands]
    with cnnkernels.use_backend(backend), poisoned_outputs():
        if residual is None:
            out = cnnkernels.conv2d_relu(x, weight, bias, **geometry)
        else:
            out = cnnkernels.conv2d_add_relu(x, weight, residual, bias, **geometry)
    assert_matches_reference(out, reference(x, weight, bias, geometry, residual),
                             reference(x, weight, bias, geometry, residual, dtype=x.dtype))
    assert out.is_contiguous(memory_format=conv_output_memory_format(x, weight))
    for before, after in zip(inputs, operands):
        assert torch.equal(before.nan_to_num(0.5), after.nan_to_num(0.5)), "an input was modified"
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_conv2d_relu(case, layout, dtype, backend, device):
    seeded()
    x, weight, bias, geometry = make_conv(case, dtype, device, layout)
    check_conv(backend, "conv2d_relu", x, weight, bias, geometry)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_conv2d_add_relu(case, dtype, backend, device):
    seeded()
    layout = LAYOUTS[list(CASES).index(case) % len(LAYOUTS)]
    x, weight, bias, geometry = make_conv(case, dtype, device, layout)
    out_shape = reference(x, weight, bias, geometry).shape
    residual = in_layout(torch.randn(out_shape, device=device).to(dtype), LAYOUTS[::-1][list(CASES).index(case) % 3])
    check_conv(backend, "conv2d_add_relu", x, weight, bias, geometry, residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["conv2d_relu", "conv2d_add_relu"])
def test_conv_output_is_channels_last_when_input_or_weight_is(op, backend, device):
    """As F.conv2d: a model moved to channels_last (its weights) makes NCHW input's outputs
    channels_last too. On the CPU the strides equal F.conv2d's, in its input gradient too."""
    seeded()
    cl, nchw = torch.channels_last, torch.contiguous_format
    for case in ("3x3", "1x1"):  # a 1x1 weight in channels_last is also contiguous: it does not count
        x, weight, bias, geometry = make_conv(case, torch.float32, device, "nchw")
        residual = torch.randn(reference(x, weight, bias, geometry).shape, device=device)
        for x_format, w_format in itertools.product([nchw, cl], repeat=2):
            xx = x.contiguous(memory_format=x_format).requires_grad_()
            ww = weight.contiguous(memory_format=w_format)
            extra = (residual,) if op == "conv2d_add_relu" else ()
            with cnnkernels.use_backend(backend):
                out = getattr(cnnkernels, op)(xx, ww, *extra, bias, **geometry)
            expected = torch.relu(F.conv2d(xx, ww, bias, **geometry) + (residual if extra else 0))
            assert out.is_contiguous(memory_format=conv_output_memory_format(xx, ww))
            weight_counts = w_format == cl and case != "1x1"
            assert memory_format_of(out) == (cl if x_format == cl or weight_counts else nchw)
            if device == "cpu":
                assert out.stride() == expected.stride()
                grad = torch.randn_like(out)
                with cnnkernels.use_backend(backend):
                    (ours,) = torch.autograd.grad(out, xx, grad)
                (theirs,) = torch.autograd.grad(expected, xx, grad)
                assert ours.stride() == theirs.stride()
            assert_matches_reference(out, reference(xx, ww, bias, geometry, residual if extra else None),
                                     expected)


# (input shape, input channels_last, weight shape, weight channels_last, stride, padding, dilation, groups):
# outputs with size-1 dimensions, contiguous in both memory formats whatever their strides say.
SIZE_ONE_CASES = [
    ((2, 3, 3, 2), False, (5, 3, 2, 2), True, (3, 2), (1, 1), (2, 2), 1),  # run in NCHW (oneDNN crash rule)
    ((1, 8, 2, 3), False, (2, 4, 3, 2), True, (3, 3), (1, 1), (1, 2), 2),  # the same, grouped
    ((3, 4, 5, 5), True, (6, 4, 5, 5), False, (1, 1), (0, 0), (1, 1), 1),  # 1x1 output
    ((1, 4, 6, 1), True, (1, 4, 3, 1), False, (1, 1), (0, 0), (1, 1), 1),  # one channel, one column
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])  # their ops: the C++ ones (CPU kernels here), the Triton ones
@pytest.mark.parametrize("case", SIZE_ONE_CASES)
def test_output_strides_equal_the_fake_kernels_where_dimensions_are_size_one(case, backend):
    """torch.compile plans memory with the fake kernels' strides, so the real ones must equal them,
    and both are those torch.empty gives the output's memory format (a tensor whose size-1
    dimensions carry another layout's strides names that layout to the next op). Seen: the C++
    op's NCHW-computed channels_last outputs kept NCHW strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import cnnkernels.triton_ops  # noqa: F401  registers the Triton ops
    seeded()
    x_shape, x_cl, w_shape, w_cl, stride, padding, dilation, groups = case
    x, weight = torch.randn(x_shape), torch.randn(w_shape)
    x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
    weight = weight.contiguous(memory_format=torch.channels_last) if w_cl else weight
    bias = torch.randn(w_shape[0])
    geometry = (list(stride), list(padding), list(dilation), groups)
    suffix = "_triton" if backend == "triton" else ""
    conv2d_relu = getattr(torch.ops.cnnkernels, "conv2d_relu" + suffix)
    conv2d_add_relu = getattr(torch.ops.cnnkernels, "conv2d_add_relu" + suffix)
    relu_backward_bias_grad = getattr(torch.ops.cnnkernels, "relu_backward_bias_grad" + suffix)
    out = conv2d_relu(x, weight, bias, *geometry)
    residual = torch.randn(out.shape)
    grad = torch.randn(out.shape).contiguous(memory_format=torch.channels_last)
    real = [out, conv2d_add_relu(x, weight, residual, bias, *geometry), *relu_backward_bias_grad(grad, out)]
    with FakeTensorMode() as mode:
        fx, fw, fb, fr, fg = map(mode.from_tensor, (x, weight, bias, residual, grad))
        fake_out = conv2d_relu(fx, fw, fb, *geometry)
        fake = [fake_out, conv2d_add_relu(fx, fw, fr, fb, *geometry), *relu_backward_bias_grad(fg, fake_out)]
    expected = torch.relu(F.conv2d(x.double().contiguous(), weight.double().contiguous(), bias.double(), *geometry))
    assert_matches_reference(out, expected, torch.relu(F.conv2d(x.contiguous(), weight.contiguous(), bias, *geometry)))
    canonical = torch.empty(out.shape, memory_format=conv_output_memory_format(x, weight)).stride()
    assert real[0].stride() == real[1].stride() == canonical
    for r, f in zip(real, fake):
        assert (r.shape, r.stride()) == (f.shape, f.stride())
    with cnnkernels.use_backend("torch"):
        assert cnnkernels.conv2d_relu(x, weight, bias, *geometry).stride() == canonical


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fake_kernels_match_the_real_outputs_over_random_small_convs(backend):
    """A random search over small geometries (size-1 dimensions, odd strides and dilations,
    groups), layouts and dtypes: each op's output and relu_backward_bias_grad's have the fake
    kernel's shape, strides and dtype. Such a search found the size-1 case above."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import cnnkernels.triton_ops  # noqa: F401  registers the Triton ops
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    suffix = "_triton" if backend == "triton" else ""
    conv2d_relu, conv2d_add_relu, add_relu, relu_backward_bias_grad = (
        getattr(torch.ops.cnnkernels, name + suffix)
        for name in ("conv2d_relu", "conv2d_add_relu", "add_relu", "relu_backward_bias_grad"))
    layouts = ["nchw", "channels_last", "sliced"]
    checked = 0
    while checked < 100:
        n, h, w = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 2, 3, 5, 8])
        c, k = rng.choice([1, 2, 3, 4, 8]), rng.choice([1, 2, 3, 5])
        groups = rng.choice([1, 1] + [g for g in (2, c) if c % g == 0 and k % g == 0 and g > 1])
        r, s = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
        stride, padding, dilation = ([rng.choice(choices), rng.choice(choices)]
                                     for choices in ([1, 2, 3], [0, 1], [1, 2]))
        if h + 2 * padding[0] < dilation[0] * (r - 1) + 1 or w + 2 * padding[1] < dilation[1] * (s - 1) + 1:
            continue
        checked += 1
        dtype = rng.choice(DTYPES)
        x = in_layout(torch.randn(n, c, h, w).to(dtype), rng.choice(layouts))
        weight = in_layout(torch.randn(k, c // groups, r, s).to(dtype), rng.choice(layouts[:2]))
        bias = torch.randn(k).to(dtype) if rng.random() < 0.5 else None
        geometry = (stride, padding, dilation, groups)
        out = conv2d_relu(x, weight, bias, *geometry)
        residual = in_layout(torch.randn(out.shape).to(dtype), rng.choice(layouts))
        other = in_layout(torch.randn(x.shape).to(dtype), rng.choice(layouts))
        grad = in_layout(torch.randn(out.shape).to(dtype), rng.choice(layouts))
        calls = [(conv2d_relu, (x, weight, bias, *geometry)), (conv2d_add_relu, (x, weight, residual, bias, *geometry)),
                 (add_relu, (x, other)), (relu_backward_bias_grad, (grad, out))]
        for op, args in calls:
            real = op(*args)
            with FakeTensorMode() as mode:
                fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
            for r_out, f_out in zip(real if isinstance(real, tuple) else [real], fake if isinstance(fake, tuple) else [fake]):
                assert (r_out.shape, r_out.stride(), r_out.dtype) == (f_out.shape, f_out.stride(), f_out.dtype), \
                    (op, [(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("channels_last", "channels_last"),
                                     ("channels_last", "nchw"), ("sliced", "channels_last")])
def test_add_relu(layouts, dtype, backend, device):
    seeded()
    shape = (3, 5, 7, 9)
    a = in_layout(torch.randn(shape, device=device).to(dtype), layouts[0])
    b = in_layout(torch.randn(shape, device=device).to(dtype), layouts[1])
    a_before, b_before = a.clone(), b.clone()
    with cnnkernels.use_backend(backend), poisoned_outputs():
        out = cnnkernels.add_relu(a, b)
    assert_matches_reference(out, torch.relu(a.double() + b.double()), torch.relu(a + b))
    assert out.stride() == torch.relu(a + b).stride()
    assert torch.equal(a, a_before) and torch.equal(b, b_before)


def assert_equal_nan_where_torch_has_it(out, expected):
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(torch.where(nan, 0, out), torch.where(nan, 0, expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_16_bit_loops_equal_torch(dtype):
    """The C++ CPU kernels' 16-bit ReLU loops (fp16: F16C intrinsics on x86; bf16: the compiler's
    vectorized code) against torch in the same dtype, which also rounds the fp32 sum once: equal
    values and NaN where torch has NaN, over lengths that leave vector tails (split over two
    threads at the largest); then in place after a conv (the epilogue's ReLU-only loop), whose
    fp16 conv runs in fp32 on CPUs without AVX-512 FP16."""
    seeded()
    for n in (6, 7, 8, 9, 1000, 2 * 65536 + 13):
        a, b = (torch.randn(n) * 100).to(dtype), (torch.randn(n) * 100).to(dtype)
        a[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-7, -1e-7, 3.0])
        b[:6] = torch.tensor([1.0, -1.0, 5.0, -1e-7, 1e-7, float("nan")])
        with cnnkernels.use_backend("cuda"), poisoned_outputs():
            out = cnnkernels.add_relu(a, b)
        assert_equal_nan_where_torch_has_it(out, torch.relu(a + b))
    x = torch.randn(2, 8, 9, 9).to(dtype)
    x[0, 1, 2, 3] = float("nan")
    weight, bias = (torch.randn(5, 8, 3, 3) / 8).to(dtype), torch.randn(5).to(dtype)
    geometry = dict(stride=1, padding=1, dilation=1, groups=1)
    with cnnkernels.use_backend("cuda"), poisoned_outputs():
        out = cnnkernels.conv2d_relu(x, weight, bias, **geometry)
    assert_matches_reference(out, reference(x, weight, bias, geometry), reference(x, weight, bias, geometry, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_16_bit_add_relu_bitwise_over_every_value(dtype):
    """Every one of the 65536 values of a 16-bit dtype (with 0, with random values, with the values
    reversed) through the C++ CPU add_relu: the same bits as torch.relu(x + y) wherever torch gives
    no NaN (its rounding, signed zeros, infinities, subnormals), and NaN exactly where it gives NaN."""
    seeded()
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    for other in (torch.zeros_like(every), torch.randn(every.shape).to(dtype), every.flip(0)):
        with cnnkernels.use_backend("cuda"), poisoned_outputs():
            out = cnnkernels.add_relu(every, other)
        expected = torch.relu(every + other)
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def permuted(shape, order, device):
    """A dense random tensor of `shape` whose dimensions lie in memory in `order`, outermost first."""
    t = torch.randn([shape[d] for d in order], device=device)
    return t.permute([order.index(d) for d in range(len(shape))])


def layout_pairs():
    """(shape, input's order, other's order): every order of a 4-D input against three of other's
    (its own, contiguous, a fixed odd one), with a size-1 dimension, 3-D and 5-D among them."""
    pairs = []
    for shape in [(2, 3, 4, 5), (2, 1, 4, 3), (3, 4, 5), (2, 3, 2, 4, 5)]:
        orders = list(itertools.permutations(range(len(shape))))
        odd = orders[len(orders) // 2 + 1]
        for order in orders[::1 if len(shape) == 4 else 5]:
            pairs += [(shape, order, other) for other in {order, orders[0], odd}]
    return pairs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_relu_lays_out_its_output_as_torch(backend, device):
    seeded()
    checked = 0
    for shape, input_order, other_order in layout_pairs():
        a, b = permuted(shape, input_order, device), permuted(shape, other_order, device)
        expected = torch.relu(a + b)
        with cnnkernels.use_backend(backend), poisoned_outputs():
            out = cnnkernels.add_relu(a, b)
        assert out.stride() == expected.stride(), (shape, input_order, other_order)
        assert torch.equal(out, expected)
        checked += expected.stride() != a.contiguous().stride()
    assert checked > 100  # most pairs are laid out other than contiguous
    t = lambda *shape: torch.randn(shape, device=device)  # noqa: E731
    for a, b in [(t(2, 3, 4, 5), t(1, 3, 1, 1).expand(2, 3, 4, 5)),  # broadcast views: stride 0
                 (t(1, 3, 1, 5).expand(2, 3, 4, 5), t(2, 1, 4, 1).expand(2, 3, 4, 5)),
                 (t(2, 3, 1, 1).expand(2, 3, 4, 5), t(2, 5, 4, 3).transpose(1, 3))]:
        with cnnkernels.use_backend(backend), poisoned_outputs():
            out = cnnkernels.add_relu(a, b)
        assert out.stride() == torch.relu(a + b).stride() and torch.equal(out, torch.relu(a + b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_through_relu(backend, device):
    x, weight, bias, geometry = make_conv("3x3", torch.float32, device, "channels_last")
    x[0, 1, 3, 4] = float("nan")
    residual = torch.randn(reference(x, weight, bias, geometry).shape, device=device)
    residual[1, 2, 5, 5] = float("nan")
    residual[1, 3, 0, 0] = -float("inf")
    out = check_conv(backend, "conv2d_add_relu", x, weight, bias, geometry, residual)
    assert out.isnan().sum() > 1  # the NaN spread through the 3x3 window and was kept
    a = torch.randn(4, 6, device=device)
    a[1, 2] = float("nan")
    with cnnkernels.use_backend(backend):
        assert torch.equal(cnnkernels.add_relu(a, -a).isnan(), a.isnan())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_and_other_may_alias_the_input(backend, device):
    x = torch.randn(2, 6, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 6, 1, 1, device=device) / 6**0.5
    check_conv(backend, "conv2d_add_relu", x, weight, torch.randn(6, device=device),
               dict(stride=1, padding=0, dilation=1, groups=1), residual=x)
    with cnnkernels.use_backend(backend):
        out = cnnkernels.add_relu(x, x)
    assert torch.equal(out, torch.relu(x + x))


# Convs that crashed F.conv2d (oneDNN, torch 2.14.1 on the CPU) with a segfault, found by random
# searches; each crashed every time it ran alone. First, dilation along a kernel dimension of size
# 1, on channels_last tensors 1-2 wide; then channels_last inputs 1-2 columns wide with column
# stride and dilation above 1 (fp32 with a bias, bf16 with or without); the last, such a conv in
# NCHW whose input, contiguous in both formats through its size-1 dimensions, has channels_last
# strides, which oneDNN follows (a random search of the public functions found it: the C++ op and
# the torch backend crashed). (dtype, N, C, K, groups, (H, W), (R, S), stride, padding, dilation,
# channels_last input (or "channels_last strides"), channels_last weight)
ONEDNN_CRASHES = [
    ("float32", 2, 24, 6, 3, (8, 1), (3, 1), (3, 3), (0, 2), (3, 3), True, False),
    ("float32", 1, 24, 9, 3, (2, 1), (3, 1), (4, 3), (3, 2), (2, 2), True, False),
    ("bfloat16", 2, 3, 8, 1, (5, 1), (1, 1), (3, 2), (3, 3), (3, 3), True, True),
    ("float32", 1, 48, 96, 48, (12, 1), (5, 1), (4, 2), (2, 1), (3, 3), True, False),
    ("bfloat16", 1, 32, 2, 2, (3, 2), (2, 1), (4, 3), (2, 1), (3, 3), False, True),
    ("float32", 3, 8, 20, 1, (7, 1), (4, 2), (1, 2), (2, 3), (1, 2), True, False),
    ("bfloat16", 3, 9, 7, 1, (9, 2), (1, 2), (3, 3), (1, 4), (3, 3), True, False),
    ("float32", 3, 5, 26, 1, (7, 2), (4, 2), (1, 4), (0, 5), (2, 3), True, True),
    ("float32", 3, 1, 8, 1, (5, 1), (3, 2), (1, 2), (0, 3), (1, 2), "channels_last strides", False),
    ("float32", 1, 64, 32, 2, (4, 1), (1, 1), (1, 2), (0, 1), (1, 2), True, True),  # grouped 1x1 (stop 36's search)
]


def test_convs_that_crashed_onednn_do_not_crash():
    """Runs in a child process, so that a crash fails this test rather than the whole run. Each
    case goes through every backend and through the C++ op called directly."""
    code = f"""
import os, torch, torch.nn.functional as F, cnnkernels
from conftest import assert_matches_reference
for dtype, n, c, k, groups, (h, w), (r, s), stride, padding, dilation, x_cl, w_cl in {ONEDNN_CRASHES!r}:
    dtype = getattr(torch, dtype)
    x = torch.randn(n, c, h, w).to(dtype)
    weight = torch.randn(k, c // groups, r, s).to(dtype)
    bias = torch.randn(k).to(dtype)
    if x_cl == "channels_last strides":
        x = x.as_strided(x.shape, torch._prims_common.make_channels_last_strides_for(x.shape))
        assert x.is_contiguous() and x.stride() != torch.empty(x.shape).stride()
    elif x_cl: x = x.contiguous(memory_format=torch.channels_last)
    if w_cl: weight = weight.contiguous(memory_format=torch.channels_last)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = torch.relu(F.conv2d(x.double(), weight.double(), bias.double(), **geometry))
    # F.conv2d in the input's dtype stands in for PyTorch's own error: the same conv in NCHW and
    # without the dilation along size-1 kernel dimensions, which changes nothing here.
    same = torch.relu(F.conv2d(x.clone(memory_format=torch.contiguous_format), weight.contiguous(), bias, stride, padding,
                               [1 if r == 1 else dilation[0], 1 if s == 1 else dilation[1]], groups))
    outs = {{}}
    for backend in cnnkernels.available_backends("cpu"):
        with cnnkernels.use_backend(backend):
            outs[backend] = cnnkernels.conv2d_relu(x, weight, bias, **geometry)
    if cnnkernels._extension.module() is not None:
        outs["torch.ops"] = torch.ops.cnnkernels.conv2d_relu(x, weight, bias, stride, padding, dilation, groups)
    for name, out in outs.items():
        assert_matches_reference(out, ref, same)
    print("ran", sorted(outs))
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert ("torch.ops" in done.stdout) == (cnnkernels._extension.module() is not None), done.stdout


# bf16 convs that F.conv2d (oneDNN, torch 2.14.1 and 2.11.0 on an AVX-512 BF16 CPU) got wrong, found
# by random searches against float64. (N, C, H, W, K, kernel, stride, padding, dilation, groups,
# layout, non-finite input values)
ONEDNN_BF16_CASES = {
    # channels_last, one output column, column stride above 1: uninitialized values, lost NaNs
    "one_column_groups3": (1, 3, 13, 3, 12, (4, 3), (1, 4), (1, 0), 1, 3, "channels_last", ["nan"]),
    "one_column_groups2": (1, 2, 10, 5, 4, (2, 2), (1, 4), (1, 0), 1, 2, "channels_last", []),
    "one_column_depthwise": (1, 16, 6, 7, 32, (3, 3), (1, 5), (1, 0), (2, 1), 16, "channels_last", []),
    # NaN and infinities spread to outputs whose windows do not hold them (small channel counts)
    "nan_groups2": (1, 2, 6, 11, 4, (3, 3), 1, 1, 1, 2, "channels_last", ["nan", "inf"]),
    "nan_groups3_dilated": (3, 3, 10, 10, 9, (2, 3), 1, (2, 3), (3, 1), 3, "channels_last", ["nan"]),
    "inf_1_channel_s2": (2, 1, 10, 6, 4, (3, 3), 2, 1, 1, 1, "channels_last", ["inf", "-inf"]),
    "inf_nchw_1_channel": (1, 1, 10, 11, 1, (3, 3), 1, 1, 1, 1, "nchw", ["inf", "-inf"]),
    "nan_nchw_3_channels": (2, 3, 12, 12, 8, (3, 3), 1, 1, 1, 1, "nchw", ["nan", "inf", "nan"]),
    "nan_nchw_1_channel": (2, 1, 9, 9, 4, (5, 5), 1, 2, 1, 1, "nchw", ["nan", "-inf"]),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on NaN
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])  # "torch" is F.conv2d as it is
@pytest.mark.parametrize("case", ONEDNN_BF16_CASES)
def test_bf16_convs_onednn_got_wrong(case, backend, device):
    seeded()
    n, c, h, w, k, (r, s), stride, padding, dilation, groups, layout, specials = ONEDNN_BF16_CASES[case]
    x = in_layout(place_values(torch.randn(n, c, h, w, device=device), specials).bfloat16(), layout)
    weight = torch.randn(k, c // groups, r, s, device=device).bfloat16()
    bias = torch.randn(k, device=device).bfloat16()
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    residual = torch.randn(reference(x, weight, bias, geometry).shape, device=device).bfloat16()
    for res in (None, in_layout(residual, layout)):
        with cnnkernels.use_backend(backend), poisoned_outputs():
            out = (cnnkernels.conv2d_relu(x, weight, bias, **geometry) if res is None
                   else cnnkernels.conv2d_add_relu(x, weight, res, bias, **geometry))
        # PyTorch's own bf16 error: its fp32 conv rounded to bf16, which these inputs do not break.
        torch_bf16 = reference(x, weight, bias, geometry, res, dtype=torch.float32).bfloat16()
        assert_matches_reference(out, reference(x, weight, bias, geometry, res), torch_bf16)
        assert out.is_contiguous(memory_format=conv_output_memory_format(x, weight))


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_bf16_non_finite_input_found_anywhere(backend):
    """The C++ CPU path scans bf16 inputs for NaN and infinities (which oneDNN's bf16 conv spreads)
    in vectorized chunks of 65536 values split over threads: a value deep in the second chunk, at
    an odd lane, must be found. F.conv2d itself got 36 outputs' NaN/infinity wrong on this input."""
    seeded()
    x = torch.randn(1, 1, 400, 400).contiguous(memory_format=torch.channels_last).bfloat16()
    x.view(-1)[112_003] = float("inf")
    weight, bias = torch.randn(4, 1, 3, 3).bfloat16(), torch.randn(4).bfloat16()
    geometry = dict(stride=1, padding=1, dilation=1, groups=1)
    torch_bf16 = reference(x, weight, bias, geometry, dtype=torch.float32).bfloat16()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with cnnkernels.use_backend(backend), poisoned_outputs():
                out = cnnkernels.conv2d_relu(x, weight, bias, **geometry)
            assert_matches_reference(out, reference(x, weight, bias, geometry), torch_bf16)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [  # (N, C, H, W, K, kernel, stride, padding): ResNet-50 / VGG layers
    (8, 64, 56, 56, 64, (3, 3), 1, 1), (8, 256, 56, 56, 64, (1, 1), 1, 0), (8, 3, 224, 224, 64, (7, 7), 2, 3),
    (8, 512, 28, 28, 256, (1, 1), 2, 0), (4, 128, 112, 112, 128, (3, 3), 1, 1), (8, 512, 14, 14, 512, (3, 3), 1, 1)])
def test_real_sizes_on_gpu(shape, dtype, backend):
    seeded()
    n, c, h, w, k, (r, s), stride, padding = shape
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, r, s, device="cuda") / (c * r * s) ** 0.5).to(dtype)
    bias = torch.randn(k, device="cuda", dtype=dtype)
    geometry = dict(stride=stride, padding=padding, dilation=1, groups=1)
    residual = torch.randn(reference(x, weight, bias, geometry, dtype=dtype).shape, device="cuda", dtype=dtype)
    check_conv(backend, "conv2d_relu", x, weight, bias, geometry)
    check_conv(backend, "conv2d_add_relu", x, weight, bias, geometry, residual.contiguous(memory_format=torch.channels_last))


@pytest.mark.gpu
@pytest.mark.big_gpu_memory
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_output_past_2_to_the_31_elements(backend):
    """A 4096x64x112x112 bf16 output (3.3e9 elements): 32-bit offsets would wrap."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    x = torch.randn(4096, 16, 112, 112, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(64, 16, 1, 1, device="cuda", dtype=torch.bfloat16) / 4
    bias = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    with cnnkernels.use_backend(backend):
        out = cnnkernels.conv2d_relu(x, weight, bias)
        residual = out.clone()
        out2 = cnnkernels.conv2d_add_relu(x, weight, residual, bias)
        summed = cnnkernels.add_relu(out, residual)
    assert out.numel() > 2**31
    for i in (0, 2047, 4095):  # images whose elements sit below and above offset 2**31
        ref = reference(x[i:i + 1], weight, bias, dict(stride=1, padding=0, dilation=1, groups=1))
        assert_matches_reference(out[i:i + 1], ref, torch.relu(F.conv2d(x[i:i + 1], weight, bias)))
        assert torch.equal(summed[i], torch.relu(out[i] + residual[i]))
        assert_matches_reference(out2[i:i + 1], torch.relu(ref + residual[i:i + 1].double()),
                                 torch.relu(F.conv2d(x[i:i + 1], weight, bias) + residual[i:i + 1]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fp16_and_tf32_on_gpu(backend):
    for dtype, tf32 in [(torch.float16, False), (torch.float32, True), (torch.float32, False)]:
        x, weight, bias, geometry = make_conv("3x3", dtype, "cuda", "channels_last")
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            check_conv(backend, "conv2d_relu", x, weight, bias, geometry)
        finally:
            torch.backends.cudnn.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_cuda_graph_capture_after_warmup(backend):
    x, weight, bias, geometry = make_conv("3x3", torch.bfloat16, "cuda", "channels_last")
    residual = torch.randn(reference(x, weight, bias, geometry).shape, device="cuda", dtype=torch.bfloat16)
    with cnnkernels.use_backend(backend):
        def step():
            y = cnnkernels.conv2d_add_relu(x, weight, residual, bias, **geometry)
            return cnnkernels.add_relu(y, residual)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            eager = step()  # warm-up: compiles and tunes outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, step())
        assert not torch.equal(captured, eager)
