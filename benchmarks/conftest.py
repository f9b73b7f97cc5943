"""Settings of the pytest-benchmark regression tests (run them explicitly: `pytest benchmarks/`;
a plain `pytest` collects tests/ only). On a GPU they time bf16 at batch 64, on a CPU a few
small fp32 cases, with the same settings as `python -m cnnkernels.bench`."""
import pytest
import torch

from cnnkernels.bench.cli import set_conditions

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCH = 64 if ON_GPU else 2

set_conditions(DEVICE)


def timed(fn, args):
    """fn(*args) as pytest-benchmark times it: warmed up (compilation, autotuning and cuDNN's
    algorithm search stay out) and synchronized, so each round is the whole device time."""
    fn(*args)
    if ON_GPU:
        torch.cuda.synchronize()

        def run():
            fn(*args)
            torch.cuda.synchronize()
        return run
    return lambda: fn(*args)


def skip_unless_runs(make):
    """make() -> fn, or a clean skip where the contender cannot run here."""
    from cnnkernels.bench.common import Unavailable, Unsupported
    try:
        return make()
    except (Unavailable, Unsupported) as why:
        pytest.skip(str(why))
