"""pytest-benchmark timings of the fused ops, per layer and contender, for regression gating:

    pytest benchmarks/test_bench_ops.py --benchmark-autosave
    pytest benchmarks/test_bench_ops.py --benchmark-compare --benchmark-compare-fail=median:10%
"""
import pytest

from cnnkernels.bench.common import GPU_OURS
from cnnkernels.bench.contenders import layer_function, make_inputs
from cnnkernels.bench.shapes import RESNET50, RESNET50_ADD_RELU, VGG16

from conftest import BATCH, DEVICE, DTYPE, ON_GPU, skip_unless_runs, timed

if ON_GPU:
    LAYERS = VGG16 + RESNET50 + RESNET50_ADD_RELU
    CONTENDERS = ("cudnn", "cudnn_fused") + GPU_OURS
else:  # a few cheap layers: both epilogues, a strided 3x3, add_relu
    names = ("layer1.0.conv2", "layer2.0.conv2", "layer4.0.conv3")
    LAYERS = tuple(l for l in RESNET50 if l.name in names) + RESNET50_ADD_RELU[-1:]
    CONTENDERS = ("eager", "onednn", "cuda")


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", LAYERS, ids=lambda c: c.label.replace(" ", "_"))
def test_layer(benchmark, case, contender):
    fn = skip_unless_runs(lambda: layer_function(contender, case, DEVICE))
    (args,) = make_inputs(case, BATCH, DTYPE, DEVICE, 1)
    benchmark.group = case.label
    benchmark.extra_info.update(flops=case.flops(BATCH), batch=BATCH, dtype=str(DTYPE))
    try:
        run = timed(fn, args)
    except NotImplementedError as why:
        pytest.skip(f"{contender} does not support this case: {why}")
    benchmark(run)
