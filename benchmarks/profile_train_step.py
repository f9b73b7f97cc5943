"""Where a training step's time goes: torch.profiler over a few ResNet-50 steps, eager (cuDNN) and
ours, same model, weights and batch as `python -m cnnkernels.bench --train`. Prints, per
contender, the step's wall time, the GPU's busy time and the kernels that take the most of it;
a step far slower than its GPU time is host-bound (Python, launches, syncs).

    python benchmarks/profile_train_step.py [--model resnet50] [--batch 128] [--contenders eager,ours_triton]
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cnnkernels.bench.train import TrainStep, build_models, make_batch, num_classes

WARMUP, PROFILED = 3, 3


class TritonCompiles:
    """Counts the Triton kernels compiled (or loaded from the disk cache) inside the block: after
    warm-up there should be none; a kernel that respecializes every step would show here."""

    def __enter__(self):
        self.names = []
        try:
            import triton.knobs
            self.knobs = triton.knobs.runtime
        except (ImportError, AttributeError):  # Tritons before knobs: not counted
            self.knobs = None
            return self
        self.previous = self.knobs.jit_cache_hook

        def hook(**kwargs):
            self.names.append(kwargs["fn"].name)
            return False  # compile as usual
        self.knobs.jit_cache_hook = hook
        return self

    def __exit__(self, *exc):
        if self.knobs is not None:
            self.knobs.jit_cache_hook = self.previous

    def __str__(self):
        if self.knobs is None:
            return "Triton compiles: not counted (this Triton has no knobs.runtime.jit_cache_hook)"
        return f"Triton compiles during the profiled steps: {len(self.names)} {sorted(set(self.names))}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--contenders", default="eager,ours_triton")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace-dir", help="also write a Chrome trace per contender here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_train_step.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    eager, _, ours = build_models(args.model, seed=0)
    x, y = make_batch(args.model, args.batch, num_classes(eager), torch.bfloat16, "cuda", seed=0)
    for contender in args.contenders.split(","):
        step = TrainStep(contender, eager if contender == "eager" else ours, "cuda", torch.bfloat16, x, y)
        for _ in range(WARMUP):
            step()
        torch.cuda.synchronize()
        with TritonCompiles() as compiles, profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(PROFILED):
                step()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3 / PROFILED
        events = prof.key_averages()
        gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / PROFILED
        launches = sum(e.count for e in events if e.self_device_time_total > 0) / PROFILED
        print(f"== {contender}: {args.model}@{args.batch} bf16, {wall_ms:.1f} ms per step (profiled), "
              f"GPU busy {gpu_ms:.1f} ms, {launches:.0f} kernels per step")
        print(compiles)
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
        if args.trace_dir:
            prof.export_chrome_trace(f"{args.trace_dir}/trace-{contender}.json")
        del step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
