"""The CUDA backend's conv planning, checked without a GPU: which CUTLASS kernel each conv would
run on an sm_90 device, and that CUTLASS's own host-side checks (can_implement) accept every conv
the benchmark times, so that none of them falls back to the generic kernel unnoticed
(cnnkernels._C.cutlass_plan; csrc/cuda/conv.cu). The kernels themselves run in the GPU tests
(tests/test_cuda_kernels.py)."""
import pytest
import torch

from cnnkernels import _extension
from cnnkernels.bench import shapes


@pytest.fixture(autouse=True)
def _default_stem_pass_size(monkeypatch):
    monkeypatch.delenv("CNNKERNELS_CUDA_STEM_PASS_BYTES", raising=False)


def cutlass_plan():
    module = _extension.module()
    if module is None or not hasattr(module, "cutlass_plan"):
        pytest.skip(f"cnnkernels._C holds no CUDA kernels: {_extension.problem() or 'a CPU-only build'}")
    if "cuda:conv_cutlass_sm90_bf16" not in module.kernels:
        pytest.skip("the extension was built without CUTLASS (install nvidia-cutlass, then rebuild)")
    return module.cutlass_plan


def plan(input_shape, weight_shape, stride, padding, dilation=(1, 1), groups=1, dtype=torch.bfloat16,
         gemm_routes=True):
    meta = dict(device="meta", dtype=dtype)
    return cutlass_plan()(torch.empty(input_shape, **meta), torch.empty(weight_shape, **meta), list(stride),
                          list(padding), list(dilation), groups, gemm_routes)


def round8(c):
    return (c + 7) // 8 * 8


BENCHMARK_LAYERS = [layer for model in shapes.MODEL_INPUTS for layer in shapes.model_conv_layers(model)]


@pytest.mark.parametrize("gemm_routes", [True, False], ids=["auto", "cutlass-conv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch", [1, 64, 256])
@pytest.mark.parametrize("layer", BENCHMARK_LAYERS, ids=lambda layer: layer.label)
def test_every_benchmark_layer_plans_onto_cutlass(layer, batch, dtype, gemm_routes):
    stride, padding = (layer.stride,) * 2, (layer.padding,) * 2
    got = plan(layer.input_shape(batch), layer.weight_shape(), stride, padding, dtype=dtype,
               gemm_routes=gemm_routes)
    if layer.out_channels % 8:  # LeNet-5's first conv (6 outputs): the generic kernel's
        assert "out channels that are a multiple of 8 (got 6)" in got["unsupported"]
        return
    assert got["unsupported"] == ""

    c, k, r = layer.in_channels, layer.out_channels, layer.kernel
    oh, ow = layer.out_hw
    stem = c < 16 and r > 1
    one_by_one = r == 1 and layer.padding == 0
    assert got["packs_windows"] == stem
    assert got["subsamples"] == (gemm_routes and one_by_one and layer.stride > 1)
    assert got["kernel"] == ("gemm" if gemm_routes and (stem or one_by_one) else "conv")
    assert got["tile_n"] == (64 if k <= 64 else 128)
    images = got["images_per_pass"]
    if stem:  # a 1x1 conv over the C*R*S window columns, rounded up to 8, a few images per pass
        assert images == stem_images_per_pass(batch, oh * ow * round8(c * r * r) * 2)
        expected = [images, oh, ow, round8(c * r * r), k, 1, 1, oh, ow, 0, 0, 1, 1, 1, 1]
    elif got["subsamples"]:  # the stride-1 1x1 conv over every stride-th pixel
        expected = [batch, oh, ow, round8(c), k, 1, 1, oh, ow, 0, 0, 1, 1, 1, 1]
    else:
        expected = [batch, layer.height, layer.width, round8(c), k, r, r, oh, ow, *padding, *stride, 1, 1]
    assert images == batch or stem
    assert got["problem"] == expected


STEM_PASS_BYTES = 64 << 20


def stem_images_per_pass(batch, image_bytes, pass_bytes=STEM_PASS_BYTES):
    """The most images whose packed windows fit in pass_bytes, at least one."""
    images = min(batch, max(1, pass_bytes // image_bytes))
    assert images == 1 or images * image_bytes <= pass_bytes
    assert images == batch or (images + 1) * image_bytes > pass_bytes
    return images


@pytest.mark.parametrize("pass_bytes, images", [("1", 1), ("3000000", 1), ("8000000", 2), ("24000000", 6),
                                                ("10000000000", 7)])
def test_stem_pass_size_follows_the_environment(pass_bytes, images, monkeypatch):
    """ResNet-50's stem over 7 images, 112x112 windows of 152 columns in bf16 (3.8 MB each), in
    passes of CNNKERNELS_CUDA_STEM_PASS_BYTES (read on every call)."""
    monkeypatch.setenv("CNNKERNELS_CUDA_STEM_PASS_BYTES", pass_bytes)
    got = plan((7, 3, 224, 224), (64, 3, 7, 7), (2, 2), (3, 3))
    assert (got["kernel"], got["packs_windows"], got["images_per_pass"]) == ("gemm", True, images)
    assert got["problem"][0] == images == stem_images_per_pass(7, 112 * 112 * 152 * 2, int(pass_bytes))


@pytest.mark.parametrize("pass_bytes", ["0", "-5", "32M", "1.5"])
def test_a_bad_stem_pass_size_is_named(pass_bytes, monkeypatch):
    monkeypatch.setenv("CNNKERNELS_CUDA_STEM_PASS_BYTES", pass_bytes)
    with pytest.raises(RuntimeError, match=f"CNNKERNELS_CUDA_STEM_PASS_BYTES must be a positive number of "
                                           f"bytes, but got '{pass_bytes}'"):
        plan((1, 3, 32, 32), (64, 3, 3, 3), (1, 1), (1, 1))


def test_a_stem_past_2_to_the_31_rows_runs_in_passes():
    """N*OH*OW = 2^33 rows: no single CUTLASS launch can take them, but a pass of 16 images can."""
    got = plan((2**17, 3, 256, 256), (64, 3, 3, 3), (1, 1), (1, 1))
    assert got["unsupported"] == ""
    assert got["images_per_pass"] == 16 == STEM_PASS_BYTES // (256 * 256 * 32 * 2)
    assert got["problem"][:5] == [16, 256, 256, 32, 64]


@pytest.mark.parametrize("input_shape, weight_shape, stride, padding, dilation, kernel", [
    ((2, 20, 13, 15), (72, 20, 1, 1), (2, 2), (0, 0), (1, 1), "gemm"),   # subsampled, channels 20 -> 24
    ((1, 16, 9, 11), (96, 16, 1, 1), (3, 2), (0, 0), (1, 1), "gemm"),    # non-square stride
    ((1, 16, 9, 9), (80, 16, 1, 1), (2, 2), (0, 0), (2, 2), "gemm"),     # dilation idle on a 1x1
    ((1, 16, 9, 9), (96, 16, 1, 1), (2, 2), (1, 1), (1, 1), "conv"),     # padded: not a GEMM
    ((1, 8, 35, 35), (16, 8, 11, 11), (4, 4), (2, 2), (1, 1), "gemm"),   # a stem: packed windows
    ((1, 16, 15, 15), (16, 16, 3, 3), (1, 1), (2, 2), (2, 2), "conv"),
    ((2, 8, 9, 8), (8, 8, 3, 1), (1, 1), (1, 0), (1, 1), "gemm"),        # non-square stem
    ((2, 16, 9, 8), (8, 16, 3, 1), (1, 1), (1, 0), (1, 1), "conv"),      # non-square kernel
    ((1, 136, 9, 9), (200, 136, 3, 3), (1, 1), (1, 1), (1, 1), "conv"),  # partial tiles
    ((1, 16, 40, 40), (16, 16, 3, 3), (8, 8), (1, 1), (1, 1), "conv"),   # stride 8: TMA im2col's most
])
def test_geometries_of_the_gpu_tests_are_accepted(input_shape, weight_shape, stride, padding, dilation, kernel):
    got = plan(input_shape, weight_shape, stride, padding, dilation)
    assert got["unsupported"] == ""
    assert got["kernel"] == kernel


@pytest.mark.parametrize("input_shape, weight_shape, stride, groups, dtype, message", [
    ((1, 16, 8, 8), (16, 16, 3, 3), (1, 1), 1, torch.float32, "needs dtype bfloat16 or float16 (got Float)"),
    ((1, 16, 8, 8), (16, 8, 3, 3), (1, 1), 2, torch.bfloat16, "needs groups == 1 (got 2)"),
    ((1, 16, 8, 8), (12, 16, 3, 3), (1, 1), 1, torch.float16, "out channels that are a multiple of 8 (got 12)"),
    ((1, 16, 40, 40), (16, 16, 3, 3), (9, 9), 1, torch.bfloat16, "TMA im2col limits"),
    # N*OH*OW = 2^31 rows: the GEMM's row count is an int, and CUTLASS's conv refuses them too
    ((2**16, 8, 256, 128), (8, 8, 1, 1), (1, 1), 1, torch.bfloat16, "N*OH*OW < 2^31"),
    ((2**15, 16, 256, 256), (16, 16, 3, 3), (1, 1), 1, torch.bfloat16, "N*OH*OW < 2^31"),
])
def test_what_cutlass_cannot_take_is_named(input_shape, weight_shape, stride, groups, dtype, message):
    padding = (weight_shape[2] // 2, weight_shape[3] // 2)
    got = plan(input_shape, weight_shape, stride, padding, groups=groups, dtype=dtype)
    assert message in got["unsupported"]


@pytest.mark.parametrize("stride", [(2**32, 1), (1, 2**31)])
def test_a_stride_past_32_bits_is_refused(stride):
    """The CUDA kernels and CUTLASS's problem shape index with 32-bit ints: a stride of 2^32
    became 0 there, and CUTLASS's host checks divided by it (SIGFPE, found by review)."""
    with pytest.raises(RuntimeError, match=r"stride, padding and dilation of 2\^31 or more are not supported"):
        plan((1, 16, 8, 8), (16, 16, 3, 3), stride, (0, 0))
