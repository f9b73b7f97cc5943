"""Host (CPU-side) cost per call of our ops, next to PyTorch's for the same work.

A training step or a small-batch forward is host-bound when Python and launch costs per op
exceed the GPU's time for it: the first H200 run's ResNet-50 training step under the "triton"
backend took 4x eager's time with a wide spread, the mark of a host-bound step.

On a GPU the calls run back to back on tiny tensors with one synchronize at the end, so the
time per call is the host's (launch cost included). On a CPU there is no launcher to measure:
the Triton launches are stubbed out and the ops take their GPU-side Python path, so the figure
is our Python and PyTorch's dispatch alone, for catching regressions; the "cuda" backend runs
its real (tiny) CPU kernels.

    python benchmarks/host_overhead.py [--reps 300]
"""
import argparse
import os
import time


def _stub_triton_launches():
    """CPU only: run the Triton ops' host code as on a GPU, without launching anything."""
    from cnnkernels.triton_ops import _autotune, _runtime

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    _runtime.launcher = lambda kernel: NoLaunch()
    _runtime.is_interpreted = lambda kernel: False
    _runtime.device_reasons = lambda *args: []
    _autotune.device_facts = lambda device: ("stub", 9, 0)


def cases(device):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import cnnkernels
    from cnnkernels import batch_norm

    def t(*shape):
        return torch.randn(*shape, device=device).contiguous(memory_format=torch.channels_last)
    x, r, w, b = t(2, 16, 4, 4), t(2, 16, 4, 4), t(16, 16, 3, 3), torch.randn(16, device=device)
    bn = nn.BatchNorm2d(16).to(device)

    def ours(backend, fn):
        def call():
            with cnnkernels.use_backend(backend):
                fn()
        return call

    def bn_unit(fused):
        def call():
            xg = x.detach().requires_grad_()
            if fused:
                with cnnkernels.use_backend("triton"):
                    y = batch_norm.batch_norm_relu_train(xg, bn, r)
            else:
                y = torch.relu(bn(xg) + r)
            y.backward(r)
        return call

    def conv_train(fused):
        wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()

        def call():
            if fused:
                with cnnkernels.use_backend("triton"):
                    y = cnnkernels.conv2d_relu(x, wg, bg, 1, 1)
            else:
                y = torch.relu(F.conv2d(x, wg, bg, 1, 1))
            y.backward(r)
        return call

    conv_relu = lambda: cnnkernels.conv2d_relu(x, w, b, 1, 1)  # noqa: E731
    conv_add_relu = lambda: cnnkernels.conv2d_add_relu(x, w, r, b, 1, 1)  # noqa: E731
    add_relu = lambda: cnnkernels.add_relu(x, r)  # noqa: E731
    return [
        ("conv2d_relu", "pytorch (F.conv2d + relu)", lambda: torch.relu(F.conv2d(x, w, b, 1, 1))),
        ("conv2d_relu", "triton", ours("triton", conv_relu)),
        ("conv2d_relu", "cuda", ours("cuda", conv_relu)),
        ("conv2d_add_relu", "pytorch (F.conv2d + add + relu)", lambda: torch.relu(F.conv2d(x, w, b, 1, 1) + r)),
        ("conv2d_add_relu", "triton", ours("triton", conv_add_relu)),
        ("conv2d_add_relu", "cuda", ours("cuda", conv_add_relu)),
        ("add_relu", "pytorch (add + relu)", lambda: torch.relu(x + r)),
        ("add_relu", "triton", ours("triton", add_relu)),
        ("add_relu", "cuda", ours("cuda", add_relu)),
        ("conv2d_relu train, fwd+bwd", "pytorch (F.conv2d + relu)", conv_train(False)),
        ("conv2d_relu train, fwd+bwd", "triton", conv_train(True)),
        ("bn+add+relu train, fwd+bwd", "pytorch (BatchNorm2d + add + relu)", bn_unit(False)),
        ("bn+add+relu train, fwd+bwd", "triton (fused)", bn_unit(True)),
    ]


def time_per_call_us(fn, reps, sync):
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / reps * 1e6)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    import torch
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # only so that the ops accept CPU tensors
        os.environ["CNNKERNELS_AUTOTUNE"] = "0"  # tuning would time real launches
        _stub_triton_launches()
    device = "cuda" if gpu else "cpu"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name() if gpu else "CPU, Triton launches stubbed out"
    print(f"host cost per call, tiny tensors, best of 5 x {args.reps} calls ({where})")
    print(f"{'op':28s} {'contender':36s} {'us/call':>8s}")
    for op, contender, fn in cases(device):
        try:
            us = f"{time_per_call_us(fn, args.reps, sync):8.1f}"
        except Exception as error:  # noqa: BLE001 - a contender this machine lacks
            us = f"  n/a: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
        print(f"{op:28s} {contender:36s} {us}")


if __name__ == "__main__":
    main()
