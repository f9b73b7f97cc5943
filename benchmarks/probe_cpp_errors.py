"""Bad arguments given straight to the C++ ops must raise RuntimeError, on CPU and CUDA tensors.

On the first H200 run (torch 2.11, Python 3.12, g++ 13.3) such calls on CPU tensors killed the
pytest worker with a segmentation fault, which this machine (g++ 12, torch 2.11 and 2.14) never
showed, not even built with Ubuntu's hardening defaults. A throw from the CUDA op's own code
(conv.cu) was caught as it should be. Each device's calls run in a process of their own (CUDA
first), so one crash does not hide the others; the exit status is non-zero if any process failed.
gpu_check.sh runs this first, and under cuda-gdb for a native backtrace when it crashes.

    python benchmarks/probe_cpp_errors.py [cpu|cuda]
"""
import subprocess
import sys

import torch

import cnnkernels  # noqa: F401  (registers torch.ops.cnnkernels)

ops = torch.ops.cnnkernels


def calls(device):
    x = torch.randn(2, 4, 8, 8, device=device)
    w = torch.randn(6, 4, 3, 3, device=device)
    b = torch.randn(6, device=device)
    yield "conv2d_relu channel mismatch", lambda: ops.conv2d_relu(
        torch.randn(2, 5, 8, 8, device=device), w, b, [1, 1], [1, 1], [1, 1], 1)
    yield "conv2d_add_relu residual size", lambda: ops.conv2d_add_relu(
        x, w, torch.randn(2, 6, 3, 3, device=device), b, [1, 1], [1, 1], [1, 1], 1)
    yield "add_relu size", lambda: ops.add_relu(x, x[:1])
    yield "relu_backward_bias_grad 3-D", lambda: ops.relu_backward_bias_grad(x[0], x[0])


def probe(device):
    for name, call in calls(device):
        print(f"{device}: {name} ...", flush=True)
        try:
            call()
        except RuntimeError as error:
            print(f"  raised: {str(error).splitlines()[0][:120]}", flush=True)
        else:
            raise SystemExit(f"{device}: {name} did not raise")
    print(f"{device}: every bad call raised RuntimeError", flush=True)


def main():
    if len(sys.argv) > 1:
        return probe(sys.argv[1])
    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    failed = []
    for device in devices:
        done = subprocess.run([sys.executable, __file__, device])
        if done.returncode != 0:
            print(f"{device}: the probe process exited with {done.returncode}", flush=True)
            failed.append(device)
    if failed:
        raise SystemExit(f"bad calls did not raise cleanly on: {', '.join(failed)}")


if __name__ == "__main__":
    main()
