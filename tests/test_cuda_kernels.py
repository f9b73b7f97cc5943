"""GPU tests of the C++/CUDA kernels in csrc/cuda, called through torch.ops.cnnkernels.*.

Each conv kernel is tested on its own: CNNKERNELS_CUDA_CONV=generic forces the generic kernels,
=cutlass forces the CUTLASS sm90 kernel (and makes it raise rather than fall back), so that a
fallback can never hide a bug in the fast path. Every test skips without a GPU, and fails
instead under CNNKERNELS_REQUIRE_CUDA=1.
"""
import contextlib
import functools
import os
import random

import pytest
import torch
import torch.nn.functional as F

import cnnkernels  # noqa: F401  (loads cnnkernels._C, which registers the ops)
from cnnkernels import _extension
from conftest import REQUIRE_CUDA, assert_matches_reference, conv_output_memory_format, cuda_or_skip, poisoned_outputs

pytestmark = pytest.mark.gpu  # every test here needs a GPU (benchmarks/gpu_check.sh runs `-m gpu` first)

ops = torch.ops.cnnkernels


def skip_or_fail(reason):
    if REQUIRE_CUDA:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _cuda_kernels_built():
    cuda_or_skip()
    if not _extension.has_cuda_kernels():
        skip_or_fail(f"cnnkernels._C holds no CUDA kernels: {_extension.problem() or 'a CPU-only build'}")


@pytest.fixture(autouse=True)
def _seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"seed {seed}")


@contextlib.contextmanager
def conv_kernel(name):
    """Runs the block with CNNKERNELS_CUDA_CONV=name (the C++ side reads it on every call)."""
    old = os.environ.get("CNNKERNELS_CUDA_CONV")
    os.environ["CNNKERNELS_CUDA_CONV"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["CNNKERNELS_CUDA_CONV"]
        else:
            os.environ["CNNKERNELS_CUDA_CONV"] = old


@contextlib.contextmanager
def tf32(enabled):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


@functools.cache
def _cutlass_problem():
    """Why the CUTLASS kernel cannot run here, or None."""
    if "cuda:conv_cutlass_sm90_bf16" not in _extension.module().kernels:
        return "the extension was built without CUTLASS (install nvidia-cutlass, then rebuild)"
    if torch.cuda.get_device_capability() != (9, 0):
        return "not a compute capability 9.0 GPU"
    x = torch.randn(1, 8, 4, 4, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 8, 1, 1, device="cuda", dtype=torch.bfloat16)
    try:
        with conv_kernel("cutlass"):
            ops.conv2d_relu(x, w, None, [1, 1], [0, 0], [1, 1], 1)
    except NotImplementedError as error:
        return str(error)
    return None


def cutlass_or_skip():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS kernels need a compute capability 9.0 GPU (H100, H200)")
    problem = _cutlass_problem()
    if problem is not None:
        skip_or_fail(problem)  # on an H100/H200 under CNNKERNELS_REQUIRE_CUDA=1, a build problem


# ---------------------------------------------------------------------------------------------
# Tensors and references


def in_layout(t, layout):
    """`t`'s values in a given layout: nchw, channels_last, sliced (a non-contiguous view into a
    NaN-filled channels_last buffer), or misaligned (channels_last-dense, but starting 1 element
    past a 16-byte boundary, which TMA cannot read)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    if layout == "sliced":
        big = torch.full((n, c + 3, h + 1, w + 2), float("nan"), dtype=t.dtype, device=t.device)
        view = big.contiguous(memory_format=torch.channels_last)[:, 1:c + 1, :h, 2:]
    elif layout == "misaligned":
        flat = torch.full((t.numel() + 1,), float("nan"), dtype=t.dtype, device=t.device)
        view = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
        assert view.is_contiguous(memory_format=torch.channels_last) and view.data_ptr() % 16 != 0
    else:
        raise ValueError(layout)
    view.copy_(t)
    return view


def pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def make_conv(shape, dtype, layout, bias=True):
    n, c, h, w, k, (r, s), stride, padding, dilation, groups = shape
    x = in_layout(torch.randn(n, c, h, w, device="cuda").to(dtype), layout)
    weight = (torch.randn(k, c // groups, r, s, device="cuda") / (c // groups * r * s) ** 0.5).to(dtype)
    b = torch.randn(k, device="cuda").to(dtype) if bias else None
    return x, weight, b, dict(stride=pair(stride), padding=pair(padding), dilation=pair(dilation), groups=groups)


def conv_reference(x, weight, bias, geometry, residual=None, dtype=torch.float64):
    """relu(conv(x) + residual) in `dtype`; the float64 one on the CPU, so that NaN stays local."""
    device = "cpu" if dtype == torch.float64 else x.device
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    out = F.conv2d(cast(x), cast(weight), cast(bias), **geometry)
    if residual is not None:
        out = out + cast(residual)
    return torch.relu(out).to(x.device)


def run_conv(x, weight, bias, geometry, residual=None):
    g = geometry
    if residual is None:
        return ops.conv2d_relu(x, weight, bias, g["stride"], g["padding"], g["dilation"], g["groups"])
    return ops.conv2d_add_relu(x, weight, residual, bias, g["stride"], g["padding"], g["dilation"], g["groups"])


def check_conv(kernel, x, weight, bias, geometry, residual=None, allow_tf32=False):
    """Runs the op with `kernel` forced into NaN-poisoned outputs and checks it against float64
    with the tolerance rule, its memory format, and that no input changed."""
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    before = [t.clone() for t in inputs]
    with conv_kernel(kernel), poisoned_outputs():
        out = run_conv(x, weight, bias, geometry, residual)
    torch.cuda.synchronize()
    with tf32(allow_tf32):
        torch_same = conv_reference(x, weight, bias, geometry, residual, dtype=x.dtype)
    assert_matches_reference(out, conv_reference(x, weight, bias, geometry, residual), torch_same)
    assert out.is_contiguous(memory_format=conv_output_memory_format(x, weight))
    for b, a in zip(before, inputs):
        assert torch.equal(b.nan_to_num(0.5), a.nan_to_num(0.5)), "an input was modified"
    return out


def output_shape(x, weight, geometry):
    (n, _, h, w), (k, _, r, s) = x.shape, weight.shape
    (sh, sw), (ph, pw), (dh, dw) = geometry["stride"], geometry["padding"], geometry["dilation"]
    return n, k, (h + 2 * ph - dh * (r - 1) - 1) // sh + 1, (w + 2 * pw - dw * (s - 1) - 1) // sw + 1


def residual_for(x, weight, geometry, layout):
    return in_layout(torch.randn(output_shape(x, weight, geometry), device="cuda").to(x.dtype), layout)


OTHER_LAYOUT = {"nchw": "channels_last", "channels_last": "nchw", "sliced": "sliced", "misaligned": "nchw"}

# ---------------------------------------------------------------------------------------------
# The generic kernels: every dtype, every geometry

# (N, C, H, W, K, kernel, stride, padding, dilation, groups)
GENERIC_CASES = {
    "1x1": (2, 5, 6, 7, 3, (1, 1), 1, 0, 1, 1),
    "3x3": (2, 3, 8, 8, 7, (3, 3), 1, 1, 1, 1),
    "5x5_s2": (1, 4, 11, 9, 6, (5, 5), 2, 2, 1, 1),
    "7x7_s2": (1, 3, 15, 13, 5, (7, 7), 2, 3, 1, 1),
    "11x11_s4": (1, 3, 23, 23, 4, (11, 11), 4, 2, 1, 1),
    "3x1": (2, 4, 7, 6, 5, (3, 1), 1, (1, 0), 1, 1),
    "1x5_s12": (1, 3, 6, 10, 4, (1, 5), (1, 2), (0, 2), 1, 1),
    "dilation2": (1, 4, 9, 9, 4, (3, 3), 1, 2, 2, 1),
    "dilation23": (1, 4, 12, 13, 4, (3, 3), 1, (2, 3), (2, 3), 1),
    "groups2": (2, 6, 7, 7, 4, (3, 3), 1, 1, 1, 2),
    "groups4_wide": (1, 64, 12, 11, 96, (3, 3), 1, 1, 1, 4),
    "depthwise": (1, 5, 8, 8, 5, (3, 3), 1, 1, 1, 5),
    "depthwise_x2": (2, 4, 9, 7, 8, (5, 3), (2, 1), (2, 1), (2, 1), 4),
    "one_channel": (1, 1, 9, 9, 3, (3, 3), 1, 1, 1, 1),
    "many_tiles": (3, 40, 9, 10, 130, (3, 3), (2, 1), (1, 0), (1, 2), 1),
    "odd_s2_batch1": (1, 7, 9, 9, 9, (3, 3), 2, 1, 1, 1),
    "kernel_is_input": (2, 2, 6, 6, 3, (6, 6), 1, 0, 1, 1),
}
# (dtype, cudnn.allow_tf32 for PyTorch's own same-dtype result; ours is IEEE fp32 either way)
GENERIC_DTYPES = {
    "fp16": (torch.float16, False), "bf16": (torch.bfloat16, False), "fp32": (torch.float32, False),
    "fp32_tf32": (torch.float32, True), "fp64": (torch.float64, False),
}


LAYOUTS = ["nchw", "channels_last", "sliced"]


def generic_params():
    """Every case in every dtype, relu and add_relu, the layout turning with the case; fp32 in
    every layout."""
    for i, case in enumerate(GENERIC_CASES):
        for dtype in GENERIC_DTYPES:
            for layout in (LAYOUTS if dtype == "fp32" else [LAYOUTS[i % 3]]):
                for residual in (False, True):
                    yield pytest.param(case, dtype, layout, residual,
                                       id=f"{case}-{dtype}-{layout}-{'add_relu' if residual else 'relu'}")


@pytest.mark.parametrize("case, dtype, layout, residual", list(generic_params()))
def test_generic_conv(case, dtype, layout, residual):
    dtype, allow_tf32 = GENERIC_DTYPES[dtype]
    x, weight, bias, geometry = make_conv(GENERIC_CASES[case], dtype, layout, bias=case != "3x1")
    res = residual_for(x, weight, geometry, OTHER_LAYOUT[layout]) if residual else None
    check_conv("generic", x, weight, bias, geometry, res, allow_tf32)


# ---------------------------------------------------------------------------------------------
# The CUTLASS sm90 kernel: bf16 and fp16, groups == 1, K % 8 == 0

CUTLASS_CASES = {
    "1x1": (2, 16, 7, 9, 24, (1, 1), 1, 0, 1, 1),  # the persistent GEMM's 64-wide tile, 24 columns used
    "3x3": (2, 32, 10, 9, 64, (3, 3), 1, 1, 1, 1),
    "3x3_s2": (1, 16, 13, 11, 32, (3, 3), 2, 1, 1, 1),
    # Fewer than 16 input channels and a kernel above 1x1: a 1x1 conv over the packed windows.
    "stem_7x7_s2_c3": (2, 3, 33, 30, 64, (7, 7), 2, 3, 1, 1),  # 147 window columns -> 152
    "vgg_first_c3": (1, 3, 20, 20, 64, (3, 3), 1, 1, 1, 1),
    "c12": (1, 12, 9, 9, 16, (3, 3), 1, 1, 1, 1),
    "c20": (1, 20, 9, 9, 24, (3, 3), 1, 1, 1, 1),  # channels padded with zeros 20 -> 24
    "5x5_no_padding": (1, 8, 12, 12, 16, (5, 5), 1, 0, 1, 1),
    "dilation2": (1, 16, 15, 15, 16, (3, 3), 1, 2, 2, 1),
    "3x1": (2, 8, 9, 8, 8, (3, 1), 1, (1, 0), 1, 1),
    "1x5_s12": (1, 8, 7, 12, 16, (1, 5), (1, 2), (0, 2), 1, 1),
    "11x11_s4": (1, 8, 35, 35, 16, (11, 11), 4, 2, 1, 1),
    # Strided 1x1 without padding: the persistent GEMM over every stride-th pixel (odd sizes,
    # channels padded 20 -> 24, a non-square stride, an idle dilation, the 64-wide tile).
    "1x1_s2": (2, 64, 14, 14, 128, (1, 1), 2, 0, 1, 1),
    "1x1_s2_gemm_odd": (2, 20, 13, 15, 72, (1, 1), 2, 0, 1, 1),
    "1x1_s32_gemm": (1, 16, 9, 11, 96, (1, 1), (3, 2), 0, 1, 1),
    "1x1_s2_dilation2_gemm": (1, 16, 9, 9, 80, (1, 1), 2, 0, 2, 1),
    "1x1_s2_k64": (2, 64, 14, 14, 64, (1, 1), 2, 0, 1, 1),
    "1x1_s2_padded": (1, 16, 9, 9, 96, (1, 1), 2, 1, 1, 1),  # padded: the conv kernel
    # 1x1, stride 1: the persistent GEMM (a partial row tile in the first; 128-wide tiles above 64
    # output channels, 64-wide ones at most).
    "1x1_gemm_k96": (2, 32, 7, 9, 96, (1, 1), 1, 0, 1, 1),
    "1x1_gemm_wide": (1, 64, 14, 14, 256, (1, 1), 1, 0, 1, 1),
    "1x1_gemm_k64": (2, 256, 14, 14, 64, (1, 1), 1, 0, 1, 1),
    "1x1_gemm_k40": (1, 72, 9, 7, 40, (1, 1), 1, 0, 1, 1),  # a partial 64-wide column tile
    "stem_gemm_k128": (1, 3, 16, 16, 128, (3, 3), 1, 1, 1, 1),  # packed windows, then the GEMM
    "c136_k200": (1, 136, 9, 9, 200, (3, 3), 1, 1, 1, 1),  # partial channel and column tiles
    "resnet_3x3": (4, 64, 28, 28, 64, (3, 3), 1, 1, 1, 1),
    "wide": (2, 256, 7, 7, 512, (3, 3), 1, 1, 1, 1),
    "m_tail": (3, 8, 5, 7, 8, (3, 3), 1, 1, 1, 1),  # N*OH*OW = 105: one partial row tile
}


def cutlass_params():
    """Every case in both dtypes: channels_last with and without bias and residual, and one
    layout that needs staging copies (nchw, sliced or misaligned, turning with the case)."""
    for i, case in enumerate(CUTLASS_CASES):
        for dtype, name in [(torch.bfloat16, "bf16"), (torch.float16, "fp16")]:
            staged = ["nchw", "sliced", "misaligned"][i % 3]
            for layout, residual, bias in [("channels_last", False, True), ("channels_last", True, True),
                                           ("channels_last", False, False), (staged, True, True)]:
                yield pytest.param(case, dtype, layout, residual, bias, id=f"{case}-{name}-{layout}-"
                                   f"{'add_relu' if residual else 'relu'}{'' if bias else '-no_bias'}")


@pytest.mark.parametrize("case, dtype, layout, residual, bias", list(cutlass_params()))
def test_cutlass_conv(case, dtype, layout, residual, bias):
    cutlass_or_skip()
    x, weight, b, geometry = make_conv(CUTLASS_CASES[case], dtype, layout, bias=bias)
    res = residual_for(x, weight, geometry, OTHER_LAYOUT[layout]) if residual else None
    check_conv("cutlass", x, weight, b, geometry, res)


# The convs that CNNKERNELS_CUDA_CONV=cutlass-conv takes off the persistent GEMM: 1x1 convs and
# stems (fewer than 16 input channels), which run CUTLASS's conv kernel there instead.
GEMM_ROUTE_CASES = [name for name, (_, c, _, _, _, kernel, *_) in CUTLASS_CASES.items()
                    if kernel == (1, 1) or c < 16]


@pytest.mark.parametrize("case", GEMM_ROUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cutlass_conv_kernel_without_the_gemm_routes(case, dtype):
    """What benchmarks/cuda_gemm_routes.py times the GEMM routes against is right too."""
    cutlass_or_skip()
    x, weight, b, geometry = make_conv(CUTLASS_CASES[case], dtype, "channels_last")
    check_conv("cutlass-conv", x, weight, b, geometry, residual_for(x, weight, geometry, "channels_last"))


@pytest.mark.parametrize("images_per_pass", [1, 2])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_stem_packed_in_passes(images_per_pass, layout, monkeypatch):
    """A stem's windows are packed and run a few images per pass: 5 images in passes of 1 or 2
    (the last one short), each pass into its own images of the output, with a residual. The
    result is the same, bit for bit, as in one pass: a row's sum does not depend on the pass."""
    cutlass_or_skip()
    x, weight, b, geometry = make_conv((5, 3, 33, 30, 64, (7, 7), 2, 3, 1, 1), torch.bfloat16, layout)
    residual = residual_for(x, weight, geometry, OTHER_LAYOUT[layout])
    _, _, oh, ow = output_shape(x, weight, geometry)
    image_bytes = oh * ow * 152 * 2  # 147 window columns, rounded up to 8, in bf16
    monkeypatch.setenv("CNNKERNELS_CUDA_STEM_PASS_BYTES", str(images_per_pass * image_bytes + image_bytes // 2))
    plan = _extension.module().cutlass_plan(x, weight, geometry["stride"], geometry["padding"],
                                            geometry["dilation"], 1)
    assert plan["images_per_pass"] == images_per_pass and plan["problem"][0] == images_per_pass
    out = check_conv("cutlass", x, weight, b, geometry, residual)
    monkeypatch.delenv("CNNKERNELS_CUDA_STEM_PASS_BYTES")
    with conv_kernel("cutlass"):
        assert torch.equal(out, run_conv(x, weight, b, geometry, residual))


def test_auto_picks_cutlass_for_bf16_and_generic_otherwise():
    cutlass_or_skip()
    x, weight, bias, geometry = make_conv(CUTLASS_CASES["3x3"], torch.bfloat16, "channels_last")
    x32, weight32, bias32 = x.float(), weight.float(), bias.float()

    def kernel_names(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not names:
            pytest.skip("the profiler recorded no CUDA kernels here")
        return " ".join(names)

    with conv_kernel("auto"):
        assert "cutlass" in kernel_names(lambda: run_conv(x, weight, bias, geometry))
        assert "conv_igemm_kernel" in kernel_names(lambda: run_conv(x32, weight32, bias32, geometry))
    with conv_kernel("generic"):
        names = kernel_names(lambda: run_conv(x, weight, bias, geometry))
        assert "conv_igemm_kernel" in names and "cutlass" not in names


@pytest.mark.parametrize("dtype, groups, k, message", [
    (torch.float32, 1, 16, "dtype bfloat16 or float16"),
    (torch.bfloat16, 2, 16, "groups == 1"),
    (torch.bfloat16, 1, 12, "multiple of 8"),
])
def test_forced_cutlass_names_what_it_cannot_do(dtype, groups, k, message):
    cutlass_or_skip()
    x = torch.randn(1, 16, 8, 8, device="cuda", dtype=dtype)
    weight = torch.randn(k, 16 // groups, 3, 3, device="cuda", dtype=dtype)
    with conv_kernel("cutlass"), pytest.raises(NotImplementedError, match=message):
        ops.conv2d_relu(x, weight, None, [1, 1], [1, 1], [1, 1], groups)
    # Left to choose, the same conv falls back to the generic kernel.
    check_conv("auto", x, weight, None, dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=groups))


def test_a_bad_kernel_choice_is_an_error():
    x = torch.randn(1, 8, 4, 4, device="cuda")
    w = torch.randn(8, 8, 1, 1, device="cuda")
    with conv_kernel("fastest"), pytest.raises(RuntimeError, match="CNNKERNELS_CUDA_CONV"):
        ops.conv2d_relu(x, w, None, [1, 1], [0, 0], [1, 1], 1)


def conv_kernels_here():
    return ["generic"] + (["cutlass"] if _cutlass_problem() is None else [])


# ---------------------------------------------------------------------------------------------
# Semantics shared by both conv kernels


@pytest.mark.parametrize("kernel", ["generic", "cutlass"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_residual_may_alias_the_input(kernel, layout):
    if kernel == "cutlass":
        cutlass_or_skip()
    x = in_layout(torch.randn(2, 16, 9, 9, device="cuda", dtype=torch.bfloat16), layout)
    weight = (torch.randn(16, 16, 3, 3, device="cuda") / 12).to(torch.bfloat16)
    bias = torch.randn(16, device="cuda", dtype=torch.bfloat16)
    check_conv(kernel, x, weight, bias, dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1), residual=x)


@pytest.mark.parametrize("kernel", ["generic", "cutlass"])
def test_channels_last_weight_turns_nchw_input_channels_last(kernel):
    """As F.conv2d through cuDNN: with a channels_last weight, NCHW input gives channels_last output."""
    if kernel == "cutlass":
        cutlass_or_skip()
    x, weight, b, geometry = make_conv(CUTLASS_CASES["3x3"], torch.bfloat16, "nchw")
    weight = weight.contiguous(memory_format=torch.channels_last)
    out = check_conv(kernel, x, weight, b, geometry, residual_for(x, weight, geometry, "nchw"))
    assert out.stride() == torch.relu(F.conv2d(x, weight, b, **geometry)).stride()


@pytest.mark.parametrize("kernel, dtype", [("generic", torch.float32), ("generic", torch.bfloat16),
                                           ("cutlass", torch.bfloat16), ("cutlass", torch.float16)])
def test_nan_propagates(kernel, dtype):
    if kernel == "cutlass":
        cutlass_or_skip()
    x, weight, bias, geometry = make_conv(CUTLASS_CASES["3x3"], dtype, "channels_last")
    x[0, 3, 4, 5] = float("nan")  # spreads through every output channel of a 3x3 window
    bias[7] = float("nan")        # a whole output channel
    residual = residual_for(x, weight, geometry, "channels_last")
    residual[1, 2, 6, 6] = float("nan")
    residual[1, 3, 0, 0] = -float("inf")
    for res in (None, residual):
        out = check_conv(kernel, x, weight, bias, geometry, res)
        assert out[0, :, 3:6, 4:7].isnan().all() and out[:, 7].isnan().all()


@pytest.mark.parametrize("kernel", ["generic", "cutlass"])
def test_empty_batch(kernel):
    if kernel == "cutlass":
        cutlass_or_skip()
    x = torch.randn(0, 8, 5, 5, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 8, 3, 3, device="cuda", dtype=torch.bfloat16)
    with conv_kernel(kernel):
        out = ops.conv2d_relu(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    assert out.shape == (0, 16, 5, 5)


# ---------------------------------------------------------------------------------------------
# add_relu

ADD_RELU_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def make_pair(layout, dtype):
    if layout == "1d_odd":
        return torch.randn(1000003, device="cuda").to(dtype), torch.randn(1000003, device="cuda").to(dtype)
    if layout == "1d_misaligned":  # dense, but not on a 16-byte boundary: the scalar kernel
        return torch.randn(4100, device="cuda").to(dtype)[1:4099], torch.randn(4100, device="cuda").to(dtype)[2:]
    if layout == "scalar":
        return torch.randn((), device="cuda").to(dtype), torch.randn((), device="cuda").to(dtype)
    if layout == "transposed_2d":
        return torch.randn(37, 29, device="cuda").to(dtype).t(), torch.randn(37, 29, device="cuda").to(dtype).t()
    if layout == "many_waves":  # more vectors than one grid covers: the grid-stride loop turns
        return torch.randn(2**25 + 5, device="cuda").to(dtype), torch.randn(2**25 + 5, device="cuda").to(dtype)
    first, second = {"nchw": ("nchw", "nchw"), "channels_last": ("channels_last", "channels_last"),
                     "mixed": ("channels_last", "nchw"), "sliced": ("sliced", "channels_last")}[layout]
    shape = (3, 5, 7, 9)
    return (in_layout(torch.randn(shape, device="cuda").to(dtype), first),
            in_layout(torch.randn(shape, device="cuda").to(dtype), second))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed", "sliced", "1d_odd", "1d_misaligned",
                                    "scalar", "transposed_2d", "many_waves"])
@pytest.mark.parametrize("dtype", ADD_RELU_DTYPES, ids=str)
def test_add_relu(dtype, layout):
    a, b = make_pair(layout, dtype)
    assert a.shape == b.shape
    a[tuple(size // 2 for size in a.shape)] = float("nan")
    before = (a.clone(), b.clone())
    with poisoned_outputs():
        out = ops.add_relu(a, b)
    # The sum is formed in float (double for double) and rounded once, as PyTorch does: bit-equal.
    torch.testing.assert_close(out, torch.relu(a + b), rtol=0, atol=0, equal_nan=True)
    assert_matches_reference(out, torch.relu(a.double() + b.double()), torch.relu(a + b))
    assert out.stride() == torch.relu(a + b).stride()
    assert torch.equal(before[0].nan_to_num(0.5), a.nan_to_num(0.5)) and torch.equal(before[1], b)


@pytest.mark.parametrize("dtype", ADD_RELU_DTYPES, ids=str)
def test_add_relu_nan_and_aliasing(dtype):
    a = torch.randn(4, 6, 5, 5, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    a[1, 2, 3, 4] = float("nan")
    a[0, 0, 0, 0] = -float("inf")
    out = ops.add_relu(a, a)  # other aliases input
    torch.testing.assert_close(out, torch.relu(a + a), rtol=0, atol=0, equal_nan=True)
    assert out.isnan().sum() == 1 and out[1, 2, 3, 4].isnan()
    assert out[0, 0, 0, 0] == 0


# ---------------------------------------------------------------------------------------------
# Offsets past 2**31, streams, devices, CUDA graphs, opcheck


def need_gpu_memory(gib):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


@pytest.mark.big_gpu_memory
@pytest.mark.parametrize("kernel, stem", [("generic", False), ("cutlass", False), ("cutlass", True)],
                         ids=["generic", "cutlass", "cutlass_stem"])
def test_conv_output_past_2_to_the_31_elements(kernel, stem):
    """A 4096x64x112x112 bf16 output has 3.3e9 elements: 32-bit offsets would wrap. The stem
    (ResNet-50's, 7x7 stride 2 over RGB) runs its packed windows in passes of a few images."""
    if kernel == "cutlass":
        cutlass_or_skip()
    need_gpu_memory(24)
    c, size, r = (3, 224, 7) if stem else (8, 112, 1)
    x = torch.randn(4096, c, size, size, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(64, c, r, r, device="cuda") / (c * r * r) ** 0.5).to(torch.bfloat16)
    bias = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    geometry = dict(stride=[2 if stem else 1] * 2, padding=[r // 2] * 2, dilation=[1, 1], groups=1)
    with conv_kernel(kernel), poisoned_outputs():
        out = run_conv(x, weight, bias, geometry)
    assert out.numel() > 2**31 and not out.isnan().any()
    for i in (0, 2047, 2674, 2675, 4095):  # 2674 straddles element 2**31 of the output, 2675 is past it
        xi = x[i:i + 1]
        assert_matches_reference(out[i:i + 1], conv_reference(xi, weight, bias, geometry),
                                 conv_reference(xi, weight, bias, geometry, dtype=torch.bfloat16))
    del out
    torch.cuda.empty_cache()


@pytest.mark.big_gpu_memory
def test_depthwise_output_past_2_to_the_31_elements():
    need_gpu_memory(24)
    x = torch.randn(4096, 64, 112, 112, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(64, 1, 3, 3, device="cuda") / 3).to(torch.bfloat16)
    geometry = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=64)
    with poisoned_outputs():
        out = run_conv(x, weight, None, geometry)
    assert out.numel() > 2**31 and not out.isnan().any()
    for i in (0, 4095):
        xi = x[i:i + 1]
        assert_matches_reference(out[i:i + 1], conv_reference(xi, weight, None, geometry),
                                 conv_reference(xi, weight, None, geometry, dtype=torch.bfloat16))
    del out, x
    torch.cuda.empty_cache()


@pytest.mark.big_gpu_memory
def test_add_relu_past_2_to_the_31_elements():
    need_gpu_memory(16)
    n = 2**31 + 4099
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with poisoned_outputs():
        out = ops.add_relu(a, b)
    for sl in (slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 4096, n)):
        assert torch.equal(out[sl], torch.relu(a[sl] + b[sl]))
    assert not out.isnan().any()
    del a, b, out
    torch.cuda.empty_cache()


def graph_cases():
    cases = [("generic", torch.float32, "nchw"), ("generic", torch.bfloat16, "channels_last")]
    return cases + [("cutlass", torch.bfloat16, "channels_last"), ("cutlass", torch.bfloat16, "nchw")]


@pytest.mark.parametrize("kernel, dtype, layout", graph_cases())
def test_cuda_graph_capture_equals_eager(kernel, dtype, layout):
    if kernel == "cutlass":
        cutlass_or_skip()
    shape = CUTLASS_CASES["stem_7x7_s2_c3" if layout == "nchw" else "3x3"]  # nchw: staging copies too
    x, weight, bias, geometry = make_conv(shape, dtype, layout)
    residual = residual_for(x, weight, geometry, layout)

    def step():
        y = run_conv(x, weight, bias, geometry, residual)
        return ops.add_relu(y, residual), run_conv(x, weight, None, geometry)

    with conv_kernel(kernel):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            residual.copy_(torch.randn_like(residual))
            graph.replay()
            torch.cuda.synchronize()
            eager = step()
            for c, e in zip(captured, eager):
                assert torch.equal(c, e)
        assert not torch.equal(captured[0], warm[0])


@pytest.mark.parametrize("kernel", ["generic", "cutlass"])
def test_runs_on_the_current_stream(kernel):
    """The inputs are written on a side stream behind a long sleep; a kernel launched anywhere
    but that stream would read them before they are written."""
    if kernel == "cutlass":
        cutlass_or_skip()
    x0, weight, bias, geometry = make_conv(CUTLASS_CASES["resnet_3x3"], torch.bfloat16, "channels_last")
    residual0 = residual_for(x0, weight, geometry, "channels_last")
    with conv_kernel(kernel):
        expected = run_conv(x0, weight, bias, geometry, residual0), ops.add_relu(x0, x0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(100_000_000)
            x = x0 * 1
            residual = residual0 * 1
            got = run_conv(x, weight, bias, geometry, residual), ops.add_relu(x, x)
        side.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_device_guard_with_tensors_on_another_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):
        x, weight, bias, geometry = make_conv(CUTLASS_CASES["3x3"], torch.bfloat16, "channels_last")
        x, weight, bias = x.to("cuda:1"), weight.to("cuda:1"), bias.to("cuda:1")
        for kernel in conv_kernels_here():
            with conv_kernel(kernel):
                out = run_conv(x, weight, bias, geometry)
            assert out.device == x.device
            torch.testing.assert_close(out.cpu().double(), conv_reference(x, weight, bias, geometry).cpu(),
                                       rtol=3e-2, atol=3e-2)
        assert torch.equal(ops.add_relu(x, x).cpu(), torch.relu(x + x).cpu())


def opcheck_samples():
    samples = []
    for dtype, layout in [(torch.float32, "nchw"), (torch.bfloat16, "channels_last"), (torch.float16, "nchw")]:
        for grad in ([False, True] if dtype == torch.float32 else [False]):
            x, weight, bias, geometry = make_conv(CUTLASS_CASES["3x3_s2"], dtype, layout)
            residual = residual_for(x, weight, geometry, layout)
            for t in (x, weight, bias, residual):
                t.requires_grad_(grad)
            g = [geometry[k] for k in ("stride", "padding", "dilation", "groups")]
            samples.append((ops.conv2d_relu.default, (x, weight, bias, *g)))
            samples.append((ops.conv2d_relu.default, (x, weight, None, *g)))
            samples.append((ops.conv2d_add_relu.default, (x, weight, residual, bias, *g)))
            # A leaf, not `residual * 0.5`: opcheck runs backward twice and the product's graph is freed after one.
            samples.append((ops.add_relu.default, (residual, (residual * 0.5).detach().requires_grad_(grad))))
    return samples


def test_opcheck_with_cuda_tensors():
    for kernel in ("generic", "auto"):  # auto: CUTLASS for bf16/fp16 where it can, generic for fp32
        with conv_kernel(kernel):
            for op, args in opcheck_samples():
                torch.library.opcheck(op, args)
