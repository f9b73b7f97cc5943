"""pytest-benchmark timings of whole models (eval mode, BN folded, channels_last), for
regression gating; see test_bench_ops.py for the commands."""
import pytest

from cnnkernels.bench.common import GPU_OURS
from cnnkernels.bench.models import model_function, model_inputs

from conftest import DEVICE, DTYPE, ON_GPU, skip_unless_runs, timed

if ON_GPU:
    CASES = (("resnet50", 64), ("vgg16", 64), ("resnet50", 1))
    CONTENDERS = ("cudnn",) + GPU_OURS
else:
    CASES = (("lenet5", 1), ("resnet50", 1))
    CONTENDERS = ("eager", "cuda")


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("model,batch", CASES, ids=[f"{m}@{b}" for m, b in CASES])
def test_model(benchmark, model, batch, contender):
    fn = skip_unless_runs(lambda: model_function(contender, model, DEVICE, DTYPE))
    benchmark.group = f"{model}@{batch}"
    benchmark.extra_info.update(batch=batch, dtype=str(DTYPE))
    benchmark(timed(fn, model_inputs(model, batch, DTYPE, DEVICE)))
