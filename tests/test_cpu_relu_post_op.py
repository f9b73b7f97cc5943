"""The C++ CPU path's ReLU as oneDNN's post-op (csrc/cpu/conv2d_relu.cpp, relu_post_op_exact).
oneDNN's ReLU turns NaN into 0, where torch.relu keeps it, so the post-op runs only where no output
can be NaN (finite input, weight and bias, magnitudes whose sums cannot overflow) and where that
check costs less than the ReLU pass it saves; every other conv keeps the pass. Each test checks the
values and, through the extension's run counter, which path ran."""
import pytest
import torch

from cnnkernels import _extension
from conftest import counts_under_env, cpu_conv_runs_in_fp32, place_values
from test_ops import check_conv, seeded

GEOMETRY = dict(stride=1, padding=1, dilation=1, groups=1)


def post_op_runs():
    return _extension.require().cpu_relu_post_op_runs()


def onednn_takes(dtype):
    """Whether the reordered-weight oneDNN path, the only one with the post-op, runs this dtype here:
    fp32 and bf16 always (bf16 natively with AVX-512 BW/VL/DQ, else in fp32); fp16 in fp32, on CPUs
    without AVX-512 FP16 (with it, fp16 convs are at::convolution's, which keeps the pass)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype in (torch.float32, torch.bfloat16) or cpu_conv_runs_in_fp32(dtype)


def expansion_conv(dtype, w_scale=None):
    """A conv whose output (64 channels) outweighs its input (3 channels) and weight, as VGG's and
    ResNet's first convs: the post-op's case. w_scale: every weight's magnitude (random signs)."""
    seeded()
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(64, 3, 3, 3) / 27**0.5
    if w_scale is not None:
        weight = weight.sign() * w_scale
    return x.to(dtype), weight.to(dtype), torch.randn(64).to(dtype)


def run(x, weight, bias, expect_post_op, op="conv2d_relu", residual=None, geometry=GEOMETRY):
    before = post_op_runs()
    out = check_conv("cuda", op, x, weight, bias, geometry, residual)
    assert post_op_runs() - before == int(expect_post_op and onednn_takes(x.dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_post_op_runs_where_no_output_can_be_nan(dtype, with_bias):
    x, weight, bias = expansion_conv(dtype)
    run(x, weight, bias if with_bias else None, expect_post_op=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["input", "weight", "bias"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_operands_keep_the_relu_pass(dtype, where, value):
    """NaN must land where the float64 reference has it: the post-op would have zeroed it. (The
    weight's is at a kernel's centre, which no output reads from the padding: F.conv2d in float64
    multiplies padding zeros by the weight, making NaN where fp32 and bf16 convs skip the padding.)"""
    x, weight, bias = expansion_conv(dtype)
    if where == "input":
        place_values(x, [value, value])
    elif where == "weight":
        weight[5, 1, 1, 1] = float(value)
    else:
        bias[5] = float(value)
    out = run(x, weight, bias, expect_post_op=False)
    if value == "nan":
        assert out.isnan().any()


@pytest.mark.parametrize("x_exponent, expect_post_op", [(120, True), (121, False)])
def test_magnitude_bound_edge(x_exponent, expect_post_op):
    """The bound relu_post_op_exact proves: |sum| < 2^(x + w + log2(taps)) + 2^b <= 2^127 needs
    x + w + log2(taps) <= 126. Here |w| < 2^0 and taps = 27 (log2 rounded up: 5), so input values
    in [2^120, 2^121) pass and [2^121, 2^122) do not. Both give finite outputs, up to 27 * 2^122."""
    x, weight, bias = expansion_conv(torch.float32, w_scale=0.75)
    x = x.sign() * 2.0**x_exponent * (1 + x.abs() / (x.abs().max() * 2))
    run(x, weight, bias, expect_post_op)


@pytest.mark.parametrize("bias_value, expect_post_op", [(2.0**125, True), (2.0**126, False)])
def test_bias_magnitude_bound_edge(bias_value, expect_post_op):
    x, weight, bias = expansion_conv(torch.float32)
    bias[5] = bias_value
    run(x, weight, bias, expect_post_op)


def test_residual_keeps_the_pass():
    """A residual may hold NaN, which the post-op would zero: conv2d_add_relu keeps the pass."""
    x, weight, bias = expansion_conv(torch.float32)
    residual = torch.randn(4, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    residual[1, 2, 3, 4] = float("nan")
    run(x, weight, bias, expect_post_op=False, op="conv2d_add_relu", residual=residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_post_op_only_where_the_check_costs_less_than_the_pass(dtype):
    """A conv whose input outweighs its output (64 > 16 channels, 1x1): in fp32 reading the input to
    check it costs more than the ReLU pass over the output; bf16 inputs that oneDNN takes natively
    are read anyway (for its bf16 NaN bug), so only the weight counts there. bf16 convs that run in
    fp32 (CPUs without AVX-512 BW) are not read, as fp32's."""
    seeded()
    expect_post_op = dtype == torch.bfloat16 and not cpu_conv_runs_in_fp32(dtype)
    x = torch.randn(4, 64, 16, 16).contiguous(memory_format=torch.channels_last).to(dtype)
    weight, bias = (torch.randn(16, 64, 1, 1) / 8).to(dtype), torch.randn(16).to(dtype)
    run(x, weight, bias, expect_post_op, geometry=dict(stride=1, padding=0, dilation=1, groups=1))


def test_switched_off_by_environment():
    """CNNKERNELS_CPU_RELU_POST_OP=0 (read once per process) keeps the ReLU pass, -0.0 included."""
    code = "\n".join([
        "import torch, cnnkernels",
        "from cnnkernels import _extension",
        "x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)",
        "with cnnkernels.use_backend('cuda'):",
        "    cnnkernels.conv2d_relu(x, torch.randn(64, 3, 3, 3), torch.randn(64), padding=1)",
        "print(_extension.module().cpu_relu_post_op_runs())",
    ])
    expected = {"0": 0, "1": int(onednn_takes(torch.float32))}
    assert counts_under_env(code, "CNNKERNELS_CPU_RELU_POST_OP", ("0", "1")) == expected
