"""Kernel-level tests of the Triton ops (cnnkernels.triton_ops).

Without CUDA they run through Triton's interpreter on the CPU at small shapes; the GPU-only
tests (real sizes, fp16, >2**31 elements, CUDA graphs, opcheck, torch.compile) skip there,
unless CNNKERNELS_REQUIRE_CUDA=1 makes them fail instead. tests/test_ops.py runs the full API
grid over the triton backend; this file covers what is specific to the kernels.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from cnnkernels import triton_ops
from cnnkernels._args import memory_format_of
from cnnkernels.triton_ops import _autotune, conv

from conftest import HAVE_CUDA as HAS_CUDA  # conftest also chose the interpreter without a GPU
from conftest import LogFunctions, LogOps, poisoned_outputs, spy_op_calls

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.on_device  # on the GPU where there is one, else in the interpreter

# Error floor of the tolerance rule, relative to the reference's largest magnitude.
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def reference(x, w, b, stride, padding, dilation, groups, residual=None, dtype=torch.float64):
    """relu(conv2d(...) [+ residual]) computed by PyTorch in `dtype`."""
    cast = lambda t: None if t is None else t.to(dtype)
    y = F.conv2d(cast(x), cast(w), cast(b), stride, padding, dilation, groups)
    if residual is not None:
        y = y + cast(residual)
    return torch.relu(y)


def assert_tolerance_rule(out, x, w, b, stride, padding, dilation, groups, residual=None):
    """Our error vs float64 is at most 2x PyTorch's own error in the same dtype, plus a floor."""
    ref = reference(x, w, b, stride, padding, dilation, groups, residual)
    ours = (out.double() - ref).abs().max().item()
    if x.dtype == torch.float64:
        theirs = 0.0
    else:
        theirs = (reference(x, w, b, stride, padding, dilation, groups, residual, dtype=x.dtype).double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert ours <= 2 * theirs + FLOOR[x.dtype] * scale, f"error {ours:.3g} vs PyTorch's {theirs:.3g} ({x.dtype})"


def make_input(shape, dtype, layout, device=DEVICE, generator=None):
    """A random NCHW-logical tensor stored as NCHW, channels_last, or a sliced (non-dense) view."""
    n, c, h, w = shape
    if layout == "sliced":  # every other channel and a crop of a bigger channels_last tensor
        big = torch.randn(n, 2 * c, h + 3, w + 2, dtype=dtype, device=device, generator=generator)
        return big.contiguous(memory_format=torch.channels_last)[:, ::2, 1 : h + 1, 2 : w + 2]
    x = torch.randn(shape, dtype=dtype, device=device, generator=generator)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def expected_format(x):
    return memory_format_of(x)


# (N, C, H, W, K, (R, S), stride, padding, dilation, groups): one case per kernel path.
CPU_CASES = [
    pytest.param(2, 16, 9, 9, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="3x3-channel-loop-even"),
    pytest.param(1, 20, 7, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="3x3-channel-loop-masked-batch1"),
    pytest.param(2, 3, 17, 15, 7, (3, 3), (2, 2), (1, 1), (1, 1), 1, id="3ch-flat-reduction-stride2"),
    pytest.param(2, 48, 24, 24, 80, (1, 1), (1, 1), (0, 0), (1, 1), 1, id="1x1-gemm-9x2-tiles"),
    pytest.param(3, 5, 10, 10, 9, (1, 1), (2, 2), (0, 0), (1, 1), 1, id="1x1-stride2-odd"),
    pytest.param(1, 3, 35, 35, 8, (11, 11), (4, 4), (2, 2), (1, 1), 1, id="11x11-stride4"),
    pytest.param(2, 12, 9, 11, 18, (3, 2), (2, 1), (1, 0), (1, 2), 3, id="nonsquare-grouped-dilated"),
    pytest.param(2, 40, 6, 6, 32, (3, 3), (1, 1), (1, 1), (1, 1), 2, id="grouped-channel-loop"),
    pytest.param(2, 7, 9, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1), 7, id="depthwise"),
    pytest.param(1, 6, 8, 10, 12, (5, 3), (1, 2), (2, 1), (2, 1), 6, id="depthwise-multiplier2"),
    pytest.param(2, 4, 31, 27, 16, (7, 7), (2, 2), (3, 3), (1, 1), 1, id="7x7-stride2-multi-tile-m"),
]


@pytest.mark.parametrize("N,C,H,W,K,kernel,stride,padding,dilation,groups", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
def test_conv_matches_float64(N, C, H, W, K, kernel, stride, padding, dilation, groups, dtype, layout):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = make_input((N, C, H, W), dtype, layout, generator=g)
    w = torch.randn(K, C // groups, *kernel, dtype=dtype, device=DEVICE, generator=g)
    b = torch.randn(K, dtype=dtype, device=DEVICE, generator=g)
    args = (list(stride), list(padding), list(dilation), groups)
    out = triton_ops.conv2d_relu_triton(x, w, b, *args)
    assert out.is_contiguous(memory_format=expected_format(x))
    assert_tolerance_rule(out, x, w, b, *args)


# (input shape, weight shape, stride, padding, groups, byte offset of the input's channel view
#  (channel_view_operands), which of (weight, input, residual, output) go as TMA descriptors with
#  the interpreter's tiles: 128x64, K blocks of 32, clamped to the problem)
TMA_CASES = [
    pytest.param((2, 32, 5, 7), (24, 32, 1, 1), 1, 0, 1, 0, (True, True, True, True), id="1x1-gemm"),
    pytest.param((2, 40, 5, 7), (24, 40, 1, 1), 1, 0, 1, 0, (True, True, True, True), id="1x1-zero-filled-channels"),
    pytest.param((2, 64, 4, 5), (48, 32, 1, 1), 1, 0, 2, 0, (True, True, False, False), id="1x1-grouped"),
    pytest.param((2, 64, 4, 5), (64, 32, 1, 1), 1, 0, 2, 0, (True, True, True, True), id="1x1-grouped-whole-tiles"),
    pytest.param((2, 48, 4, 5), (40, 24, 1, 1), 1, 0, 2, 0, (True, False, False, False), id="1x1-grouped-uneven"),
    pytest.param((2, 32, 6, 6), (24, 32, 3, 3), 1, 1, 1, 0, (True, False, True, True), id="3x3-channel-loop"),
    pytest.param((2, 8, 9, 9), (16, 8, 3, 4), 2, 1, 1, 0, (True, False, True, True), id="3x4-flat-reduction"),
    pytest.param((2, 8, 9, 9), (16, 8, 3, 3), 2, 1, 1, 0, (False, False, True, True), id="3x3-flat-rows-of-24"),
    pytest.param((2, 20, 6, 6), (5, 20, 3, 3), 1, 1, 1, 0, (False, False, False, False), id="3x3-nothing-eligible"),
    pytest.param((2, 32, 5, 7), (24, 32, 1, 1), 1, 0, 1, 16, (True, True, True, True), id="16-byte-channel-view"),
    pytest.param((2, 32, 5, 7), (24, 32, 1, 1), 1, 0, 1, 8, (False, False, False, False), id="misaligned-view-falls-back"),
]


@pytest.fixture
def descriptor_spy(monkeypatch):
    """Fresh launch plans, and a list of (weight, input, residual, output) flags, one per conv
    launch: whether that operand was passed as a TMA tensor descriptor. Launches of the
    output-box kernel also land in `descriptor_spy.boxes`, as their (images, rows, columns)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    class Launches(list):
        boxes = []

    launched = Launches()

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(tuple(isinstance(args[i], TensorDescriptor) for i in (1, 0, 3, 4)))
                if "BOX_N" in kwargs:
                    launched.boxes.append((kwargs["BOX_N"], kwargs["BOX_H"], kwargs["BOX_W"]))
                return self.kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(conv, "_PLANS", {})
    monkeypatch.setattr(conv._runtime, "launcher", Spy)
    return launched


def channel_view_operands(xs, ws, offset_bytes, dtype, device=DEVICE):
    """An input of shape xs that is a channel slice of a channels_last tensor with 8 more
    channels, starting offset_bytes into each pixel (0: a plain channels_last tensor's leading
    channels; TMA needs a 16-byte aligned base), a channels_last weight and a bias, from a fixed seed."""
    g = torch.Generator(device=device).manual_seed(2)
    n, c, h, w_ = xs
    offset = offset_bytes // dtype.itemsize
    assert offset * dtype.itemsize == offset_bytes and offset <= 8
    big = torch.randn(n, c + 8, h, w_, dtype=dtype, device=device, generator=g)
    x = big.contiguous(memory_format=torch.channels_last)[:, offset : offset + c]
    w = torch.randn(ws, dtype=dtype, device=device, generator=g) / (ws[1] * ws[2] * ws[3]) ** 0.5
    return x, w.contiguous(memory_format=torch.channels_last), torch.randn(ws[0], dtype=dtype, device=device, generator=g)


@pytest.mark.skipif(HAS_CUDA, reason="test_gpu_tma_configs runs the TMA configs on the GPU")
@pytest.mark.parametrize("xs,ws,stride,padding,groups,offset,expected", TMA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_tma_descriptors_match_float64(monkeypatch, descriptor_spy, xs, ws, stride, padding, groups, offset,
                                            expected, dtype):
    """The TMA configs (tuning candidates on Hopper) move tiles through tensor descriptors where
    the layouts allow, and use pointers elsewhere, with the same results."""
    monkeypatch.setattr(conv, "_INTERPRETER", conv._INTERPRETER._replace(tma=True))
    x, w, b = channel_view_operands(xs, ws, offset, dtype)
    args = ([stride] * 2, [padding] * 2, [1, 1], groups)
    residual = torch.randn_like(F.conv2d(x, w, b, *args)).contiguous(memory_format=torch.channels_last)
    with poisoned_outputs():  # a missed output element shows as NaN
        out = triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)
    assert descriptor_spy == [expected]
    assert not any(holds_a_tensor(plan) for plan in conv._PLANS.values())


BOX_CASES = [  # (input, weight, padding, dilation, byte offset, residual, (images, rows, columns) or None)
    pytest.param((2, 32, 8, 8), (24, 32, 3, 3), (1, 1), (1, 1), 0, True, (2, 8, 8), id="3x3-padded"),
    pytest.param((4, 32, 16, 16), (80, 32, 3, 3), (1, 1), (1, 1), 0, True, (1, 8, 16), id="16-tiles"),
    pytest.param((2, 40, 7, 7), (24, 40, 3, 3), (1, 1), (1, 1), 0, False, (2, 8, 8), id="clipped-at-edges-40-channels"),
    pytest.param((2, 16, 12, 12), (16, 16, 5, 3), (4, 2), (2, 2), 0, True, (2, 4, 16), id="5x3-dilated"),
    pytest.param((3, 32, 8, 8), (24, 32, 3, 3), (1, 1), (1, 1), 0, True, (2, 8, 8), id="images-not-a-multiple-of-box"),
    pytest.param((2, 24, 8, 8), (16, 24, 3, 3), (1, 1), (1, 1), 16, True, (2, 8, 8), id="channel-slice-view"),
    pytest.param((2, 24, 8, 8), (16, 24, 3, 3), (1, 1), (1, 1), 8, True, None, id="misaligned-view-falls-back"),
    pytest.param((2, 32, 8, 8), (24, 32, 1, 1), (0, 0), (1, 1), 0, True, "persistent only", id="1x1-plain-gemm"),
]


@pytest.mark.skipif(HAS_CUDA, reason="test_gpu_box_configs runs the output-box configs on the GPU")
@pytest.mark.parametrize("xs,ws,padding,dilation,offset,with_residual,boxes", BOX_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("persistent", [False, True])
def test_conv_output_boxes_match_float64(monkeypatch, descriptor_spy, xs, ws, padding, dilation, offset,
                                         with_residual, boxes, dtype, persistent):
    """The output-box configs (_conv_boxes_kernel, Hopper candidates for stride-1 convs): every
    operand through a TMA descriptor, the conv's padding from the descriptor's zero fill (negative
    coordinates) and stores clipped at the edges; other layouts take the GEMM kernel, as do plain
    GEMMs (1x1, unpadded) unless persistent. Persistent, 4 programs walk the tiles here."""
    monkeypatch.setattr(conv, "_INTERPRETER", conv._INTERPRETER._replace(tma=True, boxes=True, persistent=persistent))
    if boxes == "persistent only":  # as one image of N*H*W pixels in a row: runs of 128 pixels
        boxes = (1, 1, 128) if persistent else None
    x, w, b = channel_view_operands(xs, ws, offset, dtype)
    args = ([1, 1], list(padding), list(dilation), 1)
    residual = None
    if with_residual:
        residual = torch.randn_like(F.conv2d(x, w, b, *args)).contiguous(memory_format=torch.channels_last)
    with poisoned_outputs():
        if with_residual:
            out = triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)
        else:
            out = triton_ops.conv2d_relu_triton(x, w, b, *args)
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)
    assert memory_format_of(out) == torch.channels_last
    assert descriptor_spy.boxes == ([boxes] if boxes else [])
    if boxes:
        assert descriptor_spy == [(True, True, with_residual, True)]


@pytest.mark.skipif(HAS_CUDA, reason="test_gpu_tma_configs runs the TMA configs on the GPU")
@pytest.mark.parametrize("boxes", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_configs_read_width_slices_of_one_row_images(monkeypatch, descriptor_spy, boxes, dtype):
    """(N, C, 1, W) input and residual sliced along W from wider images: the row dimension's
    stride (size 1) says nothing, and one image's pixels are not W * C apart. Found by review: the
    1x1 TMA configs took them for (N*W, C) matrices and read every image after the first at the
    wrong address. They take pointers; the fresh output and the weight still go by TMA."""
    monkeypatch.setattr(conv, "_INTERPRETER", conv._INTERPRETER._replace(tma=True, boxes=boxes, persistent=boxes))
    g = torch.Generator(device=DEVICE).manual_seed(3)

    def width_slice(c):
        wide = torch.randn(3, c, 1, 40, dtype=dtype, device=DEVICE, generator=g)
        return wide.contiguous(memory_format=torch.channels_last)[..., :32]

    x, residual = width_slice(16), width_slice(24)
    w = torch.randn(24, 16, 1, 1, dtype=dtype, device=DEVICE, generator=g)
    b = torch.randn(24, dtype=dtype, device=DEVICE, generator=g)
    args = ([1, 1], [0, 0], [1, 1], 1)
    with poisoned_outputs():
        out = triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)
    assert descriptor_spy == [(True, False, False, True)] and descriptor_spy.boxes == []


@pytest.mark.skipif(HAS_CUDA, reason="test_gpu_tma_configs_on_views runs this on the GPU")
@pytest.mark.parametrize("kind", ["tma", "boxes"])
def test_tma_configs_take_an_expanded_residual_by_pointer(monkeypatch, descriptor_spy, kind):
    """A residual broadcast from one value per channel (stride 0 over images and pixels) has no
    matrix a descriptor can walk: it goes as a pointer, the box config becomes the GEMM kernel,
    and the other operands keep their descriptors."""
    boxes = kind == "boxes"
    monkeypatch.setattr(conv, "_INTERPRETER", conv._INTERPRETER._replace(tma=True, boxes=boxes, persistent=boxes))
    ws, padding = ((24, 32, 3, 3), 1) if boxes else ((24, 32, 1, 1), 0)
    x, w, b = channel_view_operands((2, 32, 8, 8), ws, 0, torch.bfloat16)
    args = ([1, 1], [padding] * 2, [1, 1], 1)
    residual = torch.randn(1, 24, 1, 1, dtype=torch.bfloat16, device=DEVICE).expand(2, 24, 8, 8)
    with poisoned_outputs():
        out = triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)
    assert descriptor_spy == [(True, not boxes, False, True)] and descriptor_spy.boxes == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("groups", [1, 4])
def test_conv_add_relu_other_dtypes(dtype, groups):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = make_input((2, 8, 7, 7), dtype, "channels_last", generator=g)
    w = torch.randn(12, 8 // groups, 3, 3, dtype=dtype, device=DEVICE, generator=g)
    residual = torch.randn(2, 12, 7, 7, dtype=dtype, device=DEVICE, generator=g)  # NCHW, output is NHWC
    args = ([1, 1], [1, 1], [1, 1], groups)
    out = triton_ops.conv2d_add_relu_triton(x, w, residual, None, *args)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_tolerance_rule(out, x, w, None, *args, residual=residual)


def test_residual_may_alias_input():
    x = make_input((2, 8, 6, 6), torch.float32, "channels_last")
    w = torch.randn(8, 8, 1, 1, device=DEVICE)
    before = x.clone()
    out = triton_ops.conv2d_add_relu_triton(x, w, x, None, [1, 1], [0, 0], [1, 1], 1)
    assert torch.equal(x, before)
    assert_tolerance_rule(out, x, w, None, [1, 1], [0, 0], [1, 1], 1, residual=x)


@pytest.mark.parametrize("path", ["gemm", "flat", "depthwise"])
def test_relu_propagates_nan_like_torch(path):
    c, groups = {"gemm": (16, 1), "flat": (3, 1), "depthwise": (4, 4)}[path]
    x = torch.randn(1, c, 6, 6, device=DEVICE)
    x[0, 0, 2, 3] = float("nan")
    w = torch.randn(4, c // groups, 3, 3, device=DEVICE)
    b = torch.randn(4, device=DEVICE)
    b[1] = float("nan")
    residual = torch.randn(1, 4, 6, 6, device=DEVICE)
    residual[0, 2, 0, 0] = float("nan")
    residual[0, 3, 5, 5] = -float("inf")
    out = triton_ops.conv2d_add_relu_triton(x, w, residual, b, [1, 1], [1, 1], [1, 1], groups)
    expected = torch.relu(F.conv2d(x, w, b, 1, 1, 1, groups) + residual)
    assert out[0, 1].isnan().all()  # relu(NaN) = NaN, where tl.maximum(x, 0) would give 0
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "geometry",
    [
        ((2, 20, 9, 9), (24, 20, 3, 3), 1, 1),  # gemm, masked channels
        ((1, 6, 8, 8), (12, 2, 3, 3), 3, 2),  # grouped, flat reduction, stride 2
        ((1, 6, 8, 8), (6, 1, 3, 3), 6, 1),  # depthwise
    ],
)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_outputs_fully_written(geometry, layout):
    """With uninitialized memory filled with NaN, any element the kernel misses stays NaN."""
    xs, ws, groups, stride = geometry
    x = make_input(xs, torch.float32, layout)
    w = torch.randn(ws, device=DEVICE)
    residual = torch.randn(xs[0], ws[0], (xs[2] - 1) // stride + 1, (xs[3] - 1) // stride + 1, device=DEVICE)
    with poisoned_outputs():
        assert torch.empty(4, device=DEVICE).isnan().all()
        out = triton_ops.conv2d_add_relu_triton(x, w, residual, None, [stride] * 2, [1, 1], [1, 1], groups)
        summed = triton_ops.add_relu_triton(residual, residual)
    assert not out.isnan().any()
    assert not summed.isnan().any()


def test_weight_writes_are_always_seen():
    """Writes through .data bump no version counter: a weight cache would miss them."""
    x = make_input((1, 8, 6, 6), torch.float32, "channels_last")
    w = torch.randn(8, 8, 3, 3, device=DEVICE)  # NCHW weight: converted for the kernel
    args = ([1, 1], [1, 1], [1, 1], 1)
    first = triton_ops.conv2d_relu_triton(x, w, None, *args)
    w.data.mul_(-1)
    second = triton_ops.conv2d_relu_triton(x, w, None, *args)
    assert_tolerance_rule(second, x, w, None, *args)
    assert not torch.equal(first, second)


def test_kernel_layout_weights_are_not_copied(monkeypatch):
    copies = []
    monkeypatch.setattr(conv, "_pack", lambda w: copies.append(w) or w.contiguous(memory_format=torch.channels_last))
    x = make_input((1, 8, 6, 6), torch.float32, "channels_last")
    for w in (
        torch.randn(8, 8, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last),
        torch.randn(8, 8, 1, 1, device=DEVICE),  # 1x1 NCHW weight is already (K, C) row-major
    ):
        out = triton_ops.conv2d_relu_triton(x, w, None, [1, 1], [0, 0], [1, 1], 1)
        assert_tolerance_rule(out, x, w, None, [1, 1], [0, 0], [1, 1], 1)
    assert copies == []
    triton_ops.conv2d_relu_triton(x, torch.randn(8, 8, 3, 3, device=DEVICE), None, [1, 1], [0, 0], [1, 1], 1)
    assert len(copies) == 1


def test_launch_plans_are_reused_and_hold_no_tensors(monkeypatch):
    """A call's launch plan is worked out once per signature (sizes, strides, dtypes, devices,
    geometry) and reused with other tensors of that signature; it must not keep any alive."""
    import gc
    import weakref
    monkeypatch.setattr(conv, "_PLANS", {})
    args = ([2, 1], [1, 1], [1, 1], 1)
    alive = []
    for _ in range(2):
        x = make_input((2, 8, 9, 7), torch.float32, "nchw")  # an input copied to channels_last
        w = torch.randn(12, 8, 3, 3, device=DEVICE)  # a weight packed for the kernel
        out = triton_ops.conv2d_relu_triton(x, w, None, *args)
        assert_tolerance_rule(out, x, w, None, *args)
        alive += [weakref.ref(x), weakref.ref(w), weakref.ref(out)]
        del x, w, out
    assert len(conv._PLANS) == 1
    gc.collect()
    assert all(ref() is None for ref in alive)
    assert not any(holds_a_tensor(plan) for plan in conv._PLANS.values())  # no scratch buffer either


def holds_a_tensor(obj):
    """Whether a tensor is reachable from obj through containers, closures and instance attributes."""
    import types
    stack, seen = [obj], set()
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.BuiltinFunctionType)):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            return True
        if isinstance(o, types.FunctionType):
            stack += [c.cell_contents for c in o.__closure__ or ()] + list(o.__dict__.values())
        elif isinstance(o, (tuple, list, set, frozenset)):
            stack += list(o)
        elif isinstance(o, dict):
            stack += list(o.values())
        elif hasattr(o, "__dict__"):
            stack += list(vars(o).values())
    return False


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed", "sliced", "1d-odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_add_relu(layout, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(2)
    shape = (2, 5, 7, 3)
    a = torch.randn(shape, dtype=dtype, device=DEVICE, generator=g)
    b = torch.randn(shape, dtype=dtype, device=DEVICE, generator=g)
    if layout == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    elif layout == "mixed":
        a = a.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        a = make_input(shape, dtype, "sliced", generator=g)
    elif layout == "1d-odd":
        a, b = a.flatten()[:201], b.flatten()[:201]
    a[(0,) * a.dim()] = float("nan")
    out = triton_ops.add_relu_triton(a, b)
    ref = torch.relu(a.double() + b.double())
    assert out.dtype == dtype and out.stride() == torch.relu(a + b).stride()
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    theirs = (torch.relu(a + b).double() - ref).nan_to_num().abs().max().item()
    ours = (out.double() - ref).nan_to_num().abs().max().item()
    assert ours <= 2 * theirs + FLOOR[dtype] * 4


def test_add_relu_other_aliases_input():
    a = torch.randn(3, 4, 5, 6, device=DEVICE)
    out = triton_ops.add_relu_triton(a, a)
    torch.testing.assert_close(out, torch.relu(2 * a))


def test_eager_calls_skip_the_dispatcher_unless_autograd_or_a_mode_needs_it(monkeypatch):
    """Plain eager calls run the ops' bodies directly (the dispatcher's cost is host time per
    call, benchmarks/host_overhead.py): a grad-tracked one inside an autograd.Function with the
    op's registered rule, whose backward's fused ReLU and bias gradient runs directly too. Under a
    dispatch or __torch_function__ mode every call takes the dispatcher, so that the mode sees the ops."""
    from cnnkernels.triton_ops import add_relu as add_relu_module, relu_backward

    calls = spy_op_calls(monkeypatch, (conv, "conv2d_relu_triton"), (conv, "conv2d_add_relu_triton"),
                         (add_relu_module, "add_relu_triton"), (relu_backward, "relu_backward_bias_grad_triton"))
    x = make_input((2, 4, 5, 5), torch.float32, "channels_last")
    w, b = torch.randn(4, 4, 3, 3, device=DEVICE), torch.randn(4, device=DEVICE)
    geometry = ([1, 1], [1, 1], [1, 1], 1)

    def forward_calls():
        return [triton_ops.conv2d_relu_triton(x, w, b, *geometry),
                triton_ops.conv2d_add_relu_triton(x, w, x, b, *geometry),
                triton_ops.add_relu_triton(x, x)]

    direct = forward_calls()
    assert calls == [("conv2d_relu_triton", "direct"), ("conv2d_add_relu_triton", "direct"),
                     ("add_relu_triton", "direct")]
    calls.clear()
    with LogOps() as log:
        through_modes = forward_calls()
    assert [way for _, way in calls] == ["dispatcher"] * 3
    assert [op for op in log.ops if "cnnkernels" in op] == [
        "cnnkernels.conv2d_relu_triton.default", "cnnkernels.conv2d_add_relu_triton.default",
        "cnnkernels.add_relu_triton.default"]
    for a, b_ in zip(direct, through_modes):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    calls.clear()
    with LogFunctions() as functions_log:  # a __torch_function__ mode sees the ops too
        forward_calls()
    assert [way for _, way in calls] == ["dispatcher"] * 3
    assert [name for name in functions_log.ops if "cnnkernels" in name] == [
        "cnnkernels.conv2d_relu_triton.default", "cnnkernels.conv2d_add_relu_triton.default",
        "cnnkernels.add_relu_triton.default"]

    calls.clear()
    w.requires_grad_()
    b.requires_grad_()
    out = triton_ops.conv2d_relu_triton(x, w, b, *geometry)
    assert type(out.grad_fn).__name__ == "cnnkernels_conv2d_reluBackward"  # our autograd.Function's node
    out.backward(torch.ones_like(out))
    assert calls == [("conv2d_relu_triton", "direct"), ("relu_backward_bias_grad_triton", "direct")]
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    torch.relu(F.conv2d(x.double(), w64, b64, padding=1)).backward(torch.ones_like(out, dtype=torch.float64))
    torch.testing.assert_close(b.grad, b64.grad.float())
    torch.testing.assert_close(w.grad, w64.grad.float())


def test_fake_and_meta_tensors_give_shapes_without_launching():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = make_input((2, 8, 10, 10), torch.float32, "channels_last")
    w = torch.randn(16, 8, 3, 3, device=DEVICE)
    real = triton_ops.conv2d_relu_triton(x, w, None, [2, 2], [1, 1], [1, 1], 1)
    with FakeTensorMode() as mode:
        fake = triton_ops.conv2d_relu_triton(mode.from_tensor(x), mode.from_tensor(w), None, [2, 2], [1, 1], [1, 1], 1)
        fake_sum = triton_ops.add_relu_triton(mode.from_tensor(x), mode.from_tensor(x))
    assert (fake.shape, fake.stride()) == (real.shape, real.stride())
    assert (fake_sum.shape, fake_sum.stride()) == (x.shape, x.stride())
    meta = triton_ops.conv2d_relu_triton(x.to("meta"), w.to("meta"), None, [2, 2], [1, 1], [1, 1], 1)
    assert meta.device.type == "meta" and meta.stride() == real.stride()


def test_op_checks_raise_in_pytorch_wording():
    x = torch.randn(1, 4, 8, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="expected input.* to have 6 channels, but got 4 channels"):
        triton_ops.conv2d_relu_triton(x, torch.randn(8, 3, 3, 3, device=DEVICE), None, [1, 1], [0, 0], [1, 1], 2)
    with pytest.raises(RuntimeError, match="should be the same"):
        triton_ops.conv2d_relu_triton(x, torch.randn(8, 4, 3, 3, device=DEVICE).double(), None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="Expected 4-dimensional input"):
        triton_ops.conv2d_relu_triton(x[0], torch.randn(8, 4, 3, 3, device=DEVICE), None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        w = torch.randn(8, 4, 3, 3, device=DEVICE)
        triton_ops.conv2d_add_relu_triton(x, w, x, None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="same shape"):
        triton_ops.add_relu_triton(x, x[:, :2])
    import torch.autograd.forward_ad as forward_ad
    with forward_ad.dual_level():  # torch.library's autograd has no jvp: the ops would drop the tangent
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.ops.cnnkernels.add_relu_triton(dual, x)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.ops.cnnkernels.conv2d_relu_triton(dual, torch.randn(8, 4, 3, 3, device=DEVICE), None,
                                                    [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="kernel size should be greater than zero"):
        triton_ops.conv2d_relu_triton(x, torch.randn(8, 4, 0, 3, device=DEVICE), None, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 0"):
        triton_ops.conv2d_relu_triton(x, torch.randn(0, 4, 3, 3, device=DEVICE), None, [1, 1], [0, 0], [1, 1], 1)


def test_unsupported_reasons():
    x = torch.randn(1, 4, 8, 8, device=DEVICE)
    w = torch.randn(8, 4, 3, 3, device=DEVICE)
    assert triton_ops.unsupported_reasons(x, w, None, None, [1, 1], [0, 0], [1, 1], 1) == []
    assert any("dtype" in r for r in triton_ops.unsupported_reasons(x.int(), w.int()))
    assert any("same dtype" in r for r in triton_ops.unsupported_reasons(x, w.double()))
    assert triton_ops.add_relu_unsupported_reasons(x, x) == []
    assert any("same shape" in r for r in triton_ops.add_relu_unsupported_reasons(x, x[0]))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-without-interpreter message")
def test_cpu_without_interpreter_is_reported():
    code = (
        "import torch; from cnnkernels import triton_ops as t; x = torch.randn(1, 2, 4, 4); "
        "print(t.unsupported_reasons(x, torch.randn(2, 2, 1, 1)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "CPU tensors need TRITON_INTERPRET=1 set before triton is imported" in result.stdout


def test_autotune_results_persist_and_capture_refuses_to_tune(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CNNKERNELS_AUTOTUNE", raising=False)
    monkeypatch.setattr(_autotune, "device_facts", lambda device: ("Test GPU", 9, 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    candidates = [_autotune.Config(64, 64, 32, 8, 4, 3), _autotune.Config(128, 128, 64, 8, 8, 3),
                  _autotune.Config(256, 256, 64, 8, 8, 3)]
    timed = []

    def bench(config):
        timed.append(config)
        if config.block_m == 256:
            raise RuntimeError("out of resource: shared memory")
        return 1.0 / config.block_m  # the bigger tile "wins"

    best = _autotune.Tuner("k").pick(torch.device("cuda"), ("shape", 1), candidates, bench, can_run=True)
    assert best == candidates[1] and timed == candidates
    assert os.path.exists(tmp_path / "autotune.json")
    # Every candidate's time, fastest first, and why one failed, for whoever tunes the lists next.
    with open(tmp_path / "autotune-timings.jsonl") as f:
        (logged,) = [json.loads(line) for line in f]
    assert logged["key"].startswith("k|Test GPU|sm90|") and logged["key"].endswith("('shape', 1)")
    assert logged["ms"] == [[list(candidates[1]), 1 / 128], [list(candidates[0]), 1 / 64]]
    assert logged["failed"] == [[list(candidates[2]), "RuntimeError: out of resource: shared memory"]]

    _autotune._disk_loaded.clear()  # as if in a new process
    again = _autotune.Tuner("k").pick(torch.device("cuda"), ("shape", 1), candidates, bench, can_run=True)
    assert again == best and len(timed) == 3  # read back from disk, not re-tuned

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warm up first"):
        _autotune.Tuner("k").pick(torch.device("cuda"), ("other shape",), candidates, bench, can_run=True)
    # Fake tensors (torch.compile tracing) never tune: they get the cached or the default config.
    assert _autotune.Tuner("k").pick(torch.device("cuda"), ("new",), candidates, bench, can_run=False) == candidates[0]


def compile_for_hopper():
    """Compile the main kernel variants for sm_90 with ptxas, no GPU needed; print what the PTX uses.

    Run in a process without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).
    """
    import json

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cnnkernels.triton_ops import add_relu

    def ptx(kernel, dtype, constexprs, config):
        signature, attrs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            else:  # what the launcher would specialize for typical sizes: 16-divisible values
                signature[name] = "*" + dtype if name.endswith("_ptr") else "i32"
                attrs[(i,)] = [["tt.divisibility", 16]]
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)
        return compiled.asm["ptx"]

    unit = dict(sok=1, srk=1, stride_b=1)  # channels_last output and residual: ints equal to 1 become constexprs
    flags = dict(HAS_BIAS=True, HAS_RES=True, PADDED=True, INTERPRETED=False)
    gemm = dict(flags, **unit, FLAT_K=False, EVEN_C=True, FMA_F64=False, ALLOW_TF32=False, GROUP_M=8, W_DESC=False,
                X_DESC=False, R_DESC=False, O_DESC=False)
    tiles = lambda c: dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k)
    hopper, fp32, fp64, dw = conv._HOPPER_16BIT[0], conv._FP32[0], conv._FP64[0], conv._DEPTHWISE[0]
    variants = {
        "gemm-bf16": (conv._conv_gemm_kernel, "bf16", dict(gemm, **tiles(hopper)), hopper),
        "gemm-fp16-flat": (conv._conv_gemm_kernel, "fp16", dict(gemm, **tiles(hopper), FLAT_K=True, EVEN_C=False), hopper),
        "gemm-fp32-tf32": (conv._conv_gemm_kernel, "fp32", dict(gemm, **tiles(fp32), ALLOW_TF32=True), fp32),
        "gemm-fp32-ieee": (conv._conv_gemm_kernel, "fp32", dict(gemm, **tiles(fp32)), fp32),
        "gemm-fp64": (conv._conv_gemm_kernel, "fp64", dict(gemm, **tiles(fp64), FMA_F64=True), fp64),
        "depthwise-bf16": (conv._conv_depthwise_kernel, "bf16", dict(flags, **unit, ACC_F64=False, BLOCK_M=dw.block_m, BLOCK_N=dw.block_n), dw),
        "add_relu-bf16": (add_relu._add_relu_kernel, "bf16", dict(BLOCK=add_relu._BLOCK, F64=False, INTERPRETED=False), conv._C(0, 0, 0, 0, add_relu._NUM_WARPS, 1)),
    }
    report = {}
    for name, (kernel, dtype, constexprs, config) in variants.items():
        code = ptx(kernel, dtype, constexprs, config)
        report[name] = {"wgmma": "wgmma" in code, "ld.v4": "ld.global.v4" in code or "cp.async.cg.shared.global" in code}
    print(json.dumps(report))


def tune_on_a_fake_hopper():
    """Tunes a bf16 conv on CPU tensors with Triton's driver replaced by a fake Hopper (the
    candidates compile; timing and launching are stubbed out) and prints, as JSON, the
    candidates and the order of compiles (with their threads) and timings.

    Run in a process without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).
    """
    import tempfile
    import threading

    import triton
    import triton.compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from cnnkernels.triton_ops import _autotune

    class FakeHopper:  # what Triton's JIT asks of a driver before it compiles
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    events = []
    real_compile = triton.compiler.compile

    def recording_compile(*args, **kwargs):
        binary = real_compile(*args, **kwargs)
        events.append(["compile", threading.current_thread().name])
        return binary

    driver.set_active(FakeHopper())
    triton.compiler.compile = recording_compile
    os.environ.update(CNNKERNELS_CACHE_DIR=tempfile.mkdtemp(), CNNKERNELS_AUTOTUNE="1")
    torch.cuda.is_current_stream_capturing = lambda: False
    _autotune.device_facts = lambda device: ("Fake Hopper", 9, 0)
    _autotune.bench_ms = lambda fn: events.append(["bench", threading.current_thread().name]) or 1.0
    captured = {}
    real_pick = _autotune.Tuner.pick

    def recording_pick(self, device, key, candidates, *args, **kwargs):
        captured["candidates"] = [list(c) for c in candidates]
        return real_pick(self, device, key, candidates, *args, **kwargs)

    _autotune.Tuner.pick = recording_pick
    x = torch.randn(8, 64, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 64, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv._make_plan(x, w, None, None, [1, 1], [1, 1], [1, 1], 1)  # tunes; a plan launches nothing
    print(json.dumps({"candidates": captured["candidates"], "events": events}))


def test_tuning_compiles_every_candidate_at_once_before_timing():
    """A new shape's candidates compile concurrently (Triton's AsyncCompileMode on a thread
    pool), all before the first is timed, so the first call waits for about one compile."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_triton_kernels as t; t.tune_on_a_fake_hopper()"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=os.path.dirname(tests_dir), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    candidates, events = report["candidates"], report["events"]
    assert len(candidates) > 2 and any(c[6] for c in candidates)  # TMA configs among them
    kinds = [kind for kind, _ in events]
    assert kinds == ["compile"] * len(candidates) + ["bench"] * len(candidates)
    assert all(thread.startswith("cnnkernels-compile") for kind, thread in events if kind == "compile")


def test_tuning_inside_a_callers_async_compile_mode_compiles_as_it_times(monkeypatch):
    """Triton allows one AsyncCompileMode at a time: inside the caller's, ours steps aside."""
    import triton
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(_autotune.os, "cpu_count", lambda: 4)  # not the one-core early return
    called = []
    with ThreadPoolExecutor(1) as pool, triton.AsyncCompileMode(pool):
        _autotune.compile_concurrently(called.append, [conv._C(64, 64, 32, 8, 4, 3), conv._C(128, 64, 32, 8, 4, 3)])
    assert called == []


def test_kernels_compile_for_hopper_without_a_gpu():
    """Catches GPU-only compile errors (the interpreter never compiles) and checks the tensor-core path."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {tests_dir!r}); import test_triton_kernels as t; t.compile_for_hopper()"
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=os.path.dirname(tests_dir), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"gemm-bf16", "gemm-fp16-flat", "gemm-fp32-tf32", "gemm-fp32-ieee", "gemm-fp64", "depthwise-bf16", "add_relu-bf16"}
    for name in ("gemm-bf16", "gemm-fp16-flat", "gemm-fp32-tf32"):
        assert report[name]["wgmma"], f"{name} does not use wgmma"
    assert not report["gemm-fp32-ieee"]["wgmma"]  # IEEE fp32 must not go through TF32 tensor cores
    assert report["gemm-bf16"]["ld.v4"] and report["add_relu-bf16"]["ld.v4"]  # 16-byte accesses


# ---------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------

GPU_CASES = [  # ResNet-50 / VGG-16 style layers at batch 8, plus odd ones
    (8, 64, 56, 56, 64, (3, 3), 1, 1, 1, 1),
    (8, 256, 56, 56, 64, (1, 1), 1, 0, 1, 1),
    (8, 128, 56, 56, 128, (3, 3), 2, 1, 1, 1),
    (8, 3, 224, 224, 64, (7, 7), 2, 3, 1, 1),
    (8, 512, 14, 14, 512, (3, 3), 1, 1, 1, 1),
    (8, 1024, 14, 14, 2048, (1, 1), 2, 0, 1, 1),
    (4, 256, 28, 28, 256, (3, 3), 1, 2, 2, 32),
    (4, 96, 28, 28, 96, (5, 5), 1, 2, 1, 96),
    (3, 37, 31, 29, 53, (3, 5), 1, (1, 2), 1, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_gpu_real_sizes(case, dtype, layout):
    n, c, h, w_, k, kernel, stride, padding, dilation, groups = case
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]
    x = make_input((n, c, h, w_), dtype, layout)
    w = torch.randn(k, c // groups, *kernel, dtype=dtype, device="cuda") / (c // groups * kernel[0] * kernel[1]) ** 0.5
    b = torch.randn(k, dtype=dtype, device="cuda")
    args = (pair(stride), pair(padding), pair(dilation), groups)
    residual = torch.randn_like(F.conv2d(x, w, b, *args))
    out = triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)
    assert out.is_contiguous(memory_format=expected_format(x))
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_fp32_follows_cudnn_tf32_flag(tf32):
    x = make_input((4, 256, 28, 28), torch.float32, "channels_last")
    w = torch.randn(256, 256, 3, 3, device="cuda") / 48
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
        out = triton_ops.conv2d_relu_triton(x, w, None, [1, 1], [1, 1], [1, 1], 1)
        ref = reference(x, w, None, [1, 1], [1, 1], [1, 1], 1)
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        if tf32:
            assert_tolerance_rule(out, x, w, None, [1, 1], [1, 1], [1, 1], 1)
        else:
            assert err < 1e-5  # IEEE fp32, not TF32 (which would be ~1e-3)


@pytest.mark.gpu
@pytest.mark.big_gpu_memory
def test_gpu_output_over_2_pow_31_elements():
    shape, k = (4096, 16, 112, 112), 64  # output 4096x64x112x112 = 3.3e9 elements
    needed = 2 * (4096 * (16 + 2 * 64) * 112 * 112)  # input, output and one reference chunk, bf16
    if torch.cuda.get_device_properties(0).total_memory < needed * 1.3:
        pytest.skip("not enough GPU memory")
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, 16, 1, 1, dtype=torch.bfloat16, device="cuda") / 4
    out = triton_ops.conv2d_relu_triton(x, w, None, [1, 1], [0, 0], [1, 1], 1)
    assert out.numel() > 2**31
    for lo in (0, 2048, 4064):  # the tail is where 32-bit offsets would wrap
        chunk = slice(lo, lo + 32)
        assert_tolerance_rule(out[chunk], x[chunk], w, None, [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_after_warmup():
    x = make_input((8, 64, 28, 28), torch.bfloat16, "channels_last")
    w = torch.randn(64, 64, 3, 3, dtype=torch.bfloat16, device="cuda")  # NCHW: packed inside the graph
    residual = torch.randn(8, 64, 28, 28, dtype=torch.bfloat16, device="cuda")
    call = lambda: triton_ops.conv2d_add_relu_triton(x, w, residual, None, [1, 1], [1, 1], [1, 1], 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = call()  # warm-up: tunes and compiles
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    x.normal_()
    with torch.no_grad():
        w.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, call())
    assert not torch.equal(captured, eager)


GPU_TMA_CASES = [  # (input, weight, stride, padding, groups, (weight, input, residual, output) as descriptors)
    ((8, 256, 28, 28), (512, 256, 1, 1), 1, 0, 1, (True, True, True, True)),
    ((8, 256, 28, 28), (80, 256, 1, 1), 1, 0, 1, (True, True, True, True)),  # stores clipped at 80 of 128 channels
    ((8, 64, 28, 28), (96, 32, 1, 1), 1, 0, 2, (True, True, False, False)),  # 48 channels per group, 64-wide tiles
    ((8, 128, 28, 28), (128, 128, 3, 3), 1, 1, 1, (True, False, True, True)),
    ((8, 8, 32, 32), (64, 8, 3, 4), 2, 1, 1, (True, False, True, True)),  # FLAT_K, kernel rows of 32 = BLOCK_K
]


GPU_BOX_CASES = [  # (input, weight, padding, dilation, (images, rows, columns) the box config picks)
    ((8, 64, 56, 56), (64, 64, 3, 3), 1, 1, (2, 8, 8)),
    ((16, 128, 28, 28), (128, 128, 3, 3), 1, 1, (8, 4, 4)),
    ((64, 256, 7, 7), (256, 256, 3, 3), 1, 1, (16, 1, 8)),  # clipped at the right edge
    ((3, 128, 8, 8), (128, 128, 3, 3), 1, 1, (2, 8, 8)),  # the last box half past the last image
    ((8, 64, 30, 30), (96, 64, 3, 3), 2, 2, (2, 2, 32)),  # dilated, clipped at the right edge
    ((32, 256, 14, 14), (1024, 256, 1, 1), 0, 1, (1, 1, 128)),  # a plain GEMM: persistent configs only
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_BOX_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("persistent", [False, True])
def test_gpu_box_configs(monkeypatch, tmp_path, descriptor_spy, case, dtype, persistent):
    """The output-box tuning candidates (Hopper, 16-bit, stride 1; one program per tile or per
    SM) against float64, with and without a residual, and under CUDA-graph replay."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the output-box configs are Hopper candidates")
    xs, ws, padding, dilation, boxes = case
    use_first_hopper_config(monkeypatch, tmp_path, lambda c: c.boxes and c.persistent == persistent)
    x, w, b = gpu_conv_operands(xs, ws, dtype)
    args = ([1, 1], [padding] * 2, [dilation] * 2, 1)
    residual = torch.randn_like(F.conv2d(x, w, b, *args))
    with poisoned_outputs():
        assert_tolerance_rule(triton_ops.conv2d_relu_triton(x, w, b, *args), x, w, b, *args)
        call = lambda: triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)
        out = call()
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)
    assert descriptor_spy == [(True, True, False, True), (True, True, True, True)]
    plain_gemm = ws[2] == ws[3] == 1 and padding == 0  # without persistence, the GEMM kernel's X_DESC case
    assert descriptor_spy.boxes == ([] if plain_gemm and not persistent else [boxes, boxes])
    assert_graph_replay_matches(call, x)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_TMA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_tma_configs(monkeypatch, tmp_path, descriptor_spy, case, dtype):
    """The TMA tuning candidates (Hopper, 16-bit) against float64, eager and under CUDA-graph replay."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA configs are Hopper candidates")
    xs, ws, stride, padding, groups, expected = case
    use_first_hopper_config(monkeypatch, tmp_path, lambda c: c.tma and not c.boxes)
    x, w, b = gpu_conv_operands(xs, ws, dtype)
    args = ([stride] * 2, [padding] * 2, [1, 1], groups)
    residual = torch.randn_like(F.conv2d(x, w, b, *args))
    call = lambda: triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)
    out = call()
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)
    assert descriptor_spy == [expected]
    assert_graph_replay_matches(call, x)


GPU_VIEW_CASES = {  # view -> ((weight, input, residual, output) as descriptors, boxes) for the TMA and box configs
    "channel-slice-16-bytes": {"tma": ((True, True, True, True), []), "boxes": ((True, True, True, True), [(1, 8, 16)])},
    "channel-slice-8-bytes": {"tma": ((False,) * 4, []), "boxes": ((False,) * 4, [])},  # the pointer twin
    "expanded-residual": {"tma": ((True, True, False, True), []), "boxes": ((True, False, False, True), [])},
}


@pytest.mark.gpu
@pytest.mark.parametrize("view", GPU_VIEW_CASES)
@pytest.mark.parametrize("kind", ["tma", "boxes"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_tma_configs_on_views(monkeypatch, tmp_path, descriptor_spy, view, kind, dtype):
    """The TMA and output-box candidates on operands no descriptor or only some can walk: an input
    sliced from wider pixels 8 bytes in (misaligned: every operand goes as a pointer) or 16 bytes
    in, and a residual broadcast from one value per channel. Against float64 and under CUDA-graph
    replay."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA configs are Hopper candidates")
    use_first_hopper_config(monkeypatch, tmp_path, (lambda c: c.boxes and not c.persistent) if kind == "boxes"
                            else (lambda c: c.tma and not c.boxes))
    xs, ws, padding = ((8, 64, 16, 16), (64, 64, 3, 3), 1) if kind == "boxes" else ((8, 256, 28, 28), (256, 256, 1, 1), 0)
    offset = {"channel-slice-16-bytes": 16, "channel-slice-8-bytes": 8}.get(view, 0)
    x, w, b = channel_view_operands(xs, ws, offset, dtype, device="cuda")
    args = ([1, 1], [padding] * 2, [1, 1], 1)
    out_shape = F.conv2d(x, w, b, *args).shape
    if view == "expanded-residual":
        residual = torch.randn(1, ws[0], 1, 1, dtype=dtype, device="cuda").expand(out_shape)
    else:
        residual = torch.randn(out_shape, dtype=dtype, device="cuda").contiguous(memory_format=torch.channels_last)
    call = lambda: triton_ops.conv2d_add_relu_triton(x, w, residual, b, *args)  # noqa: E731
    with poisoned_outputs():
        out = call()
    assert_tolerance_rule(out, x, w, b, *args, residual=residual)
    flags, boxes = GPU_VIEW_CASES[view][kind]
    assert descriptor_spy == [flags] and descriptor_spy.boxes == boxes
    assert_graph_replay_matches(call, x)


def use_first_hopper_config(monkeypatch, tmp_path, keep):
    """Only the Hopper 16-bit candidates that `keep` accepts, untuned: the first of them runs,
    whatever was tuned before."""
    monkeypatch.setattr(conv, "_HOPPER_16BIT", [c for c in conv._HOPPER_16BIT if keep(c)])
    monkeypatch.setenv("CNNKERNELS_AUTOTUNE", "0")
    monkeypatch.setenv("CNNKERNELS_CACHE_DIR", str(tmp_path))


def gpu_conv_operands(xs, ws, dtype):
    """A channels_last input, a channels_last weight scaled to keep outputs near 1, a bias."""
    x = make_input(xs, dtype, "channels_last")
    w = (torch.randn(ws, dtype=dtype, device="cuda") / (ws[1] * ws[2] * ws[3]) ** 0.5).contiguous(
        memory_format=torch.channels_last)
    return x, w, torch.randn(ws[0], dtype=dtype, device="cuda")


def assert_graph_replay_matches(call, x):
    """call() captured in a CUDA graph, then replayed on new values of x, equals an eager call."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    x.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, call())


@pytest.mark.gpu
def test_gpu_capture_without_warmup_asks_to_warm_up(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CNNKERNELS_AUTOTUNE", "1")
    x = make_input((2, 40, 17, 17), torch.float16, "channels_last")  # a shape no other test tunes
    w = torch.randn(24, 40, 3, 3, dtype=torch.float16, device="cuda").contiguous(memory_format=torch.channels_last)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm up first"):
        with torch.cuda.graph(graph):
            triton_ops.conv2d_relu_triton(x, w, None, [1, 1], [1, 1], [1, 1], 1)


@pytest.mark.gpu
def test_gpu_opcheck():
    x = make_input((2, 16, 9, 9), torch.float16, "channels_last")
    w = torch.randn(8, 16, 3, 3, dtype=torch.float16, device="cuda")
    b = torch.randn(8, dtype=torch.float16, device="cuda")
    residual = torch.randn(2, 8, 9, 9, dtype=torch.float16, device="cuda")
    # Autograd for these ops is registered centrally (cnnkernels._autograd), not tested here.
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.cnnkernels.conv2d_relu_triton, (x, w, b, [1, 1], [1, 1], [1, 1], 1), test_utils=utils)
    torch.library.opcheck(
        torch.ops.cnnkernels.conv2d_add_relu_triton, (x, w, residual, b, [1, 1], [1, 1], [1, 1], 1), test_utils=utils
    )
    torch.library.opcheck(torch.ops.cnnkernels.add_relu_triton, (residual, residual), test_utils=utils)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    x = make_input((2, 16, 9, 9), torch.bfloat16, "nchw")
    w = torch.randn(8, 16, 3, 3, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16, device="cuda")

    @torch.compile(fullgraph=True)
    def f(x, w, residual):
        y = torch.ops.cnnkernels.conv2d_add_relu_triton(x, w, residual, None, [1, 1], [1, 1], [1, 1], 1)
        return torch.ops.cnnkernels.add_relu_triton(y, residual)

    out = f(x, w, residual)
    expected = triton_ops.add_relu_triton(triton_ops.conv2d_add_relu_triton(x, w, residual, None, [1, 1], [1, 1], [1, 1], 1), residual)
    assert out.stride() == expected.stride()
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the other tests compile and run the kernels for real")
def test_every_kernel_compiles_for_hopper():
    """Triton's compiler and ptxas run without a GPU: every kernel, in the configs its launch
    code picks, must compile for sm_90 (the interpreter checks none of tl.dot's rules), without
    register spills. tests/triton_hopper_compile.py without --quick covers every dtype."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_hopper_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "0 failed, 0 spill" in done.stdout
    assert "wgmma" in done.stdout  # 16-bit tiles reach Hopper's wgmma
    assert "W_DESC=True X_DESC=True" in done.stdout and "TMA loads" in done.stdout  # the TMA candidates
    checked = re.search(r"(\d+) TMA descriptors checked", done.stdout)
    assert checked and int(checked.group(1)) > 0, done.stdout[-2000:]


@pytest.mark.skipif(HAS_CUDA, reason="runs with test_every_kernel_compiles_for_hopper")
def test_the_tma_descriptor_check_names_what_the_driver_refuses():
    """The compile script's check of each launch's descriptors can fail: every limit is flagged.
    In a subprocess, since importing the script replaces the Triton ops' launcher."""
    code = textwrap.dedent("""
        from types import SimpleNamespace as NS
        import triton_hopper_compile as t
        base = NS(data_ptr=lambda: 4096)
        meta = dict(elem_size=2, block_size=[128, 64], swizzle=3)
        assert t.tma_descriptor_problems(NS(base=base, shape=[256, 64], strides=[64, 1]), meta) == []
        cases = {
            "not a multiple of 16": NS(base=base, shape=[256, 60], strides=[60, 1]),
            "not 16-byte aligned": NS(base=NS(data_ptr=lambda: 4104), shape=[256, 64], strides=[64, 1]),
            "outside 1..2^32": NS(base=base, shape=[2**33, 64], strides=[64, 1]),
            "innermost stride": NS(base=base, shape=[256, 64], strides=[64, 2]),
        }
        for words, desc in cases.items():
            assert any(words in p for p in t.tma_descriptor_problems(desc, meta)), words
        assert any("outside 1..256" in p for p in t.tma_descriptor_problems(
            NS(base=base, shape=[1024, 64], strides=[64, 1]), dict(meta, block_size=[512, 64])))
        assert any("swizzle" in p for p in t.tma_descriptor_problems(
            NS(base=base, shape=[256, 128], strides=[128, 1]), dict(meta, block_size=[64, 128])))
        print("checked")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0 and "checked" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
