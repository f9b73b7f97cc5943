"""Bad arguments given straight to the C++ ops must raise RuntimeError, on CPU and CUDA tensors.

On the first H200 run (torch 2.11, Python 3.12) such calls on CPU tensors killed the pytest
worker with a segmentation fault, which this machine (torch 2.11 and 2.14) never showed.
gpu_check.sh runs this first, and under cuda-gdb for a native backtrace when it crashes.
"""
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


def main():
    # CPU again after CUDA: whether CUDA (and its libraries) being initialized changes anything.
    devices = ["cpu"] + (["cuda", "cpu"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, call in calls(device):
            print(f"{device}: {name} ...", flush=True)
            try:
                call()
            except RuntimeError as error:
                print(f"  raised: {str(error).splitlines()[0][:120]}", flush=True)
            else:
                raise SystemExit(f"{device}: {name} did not raise")
    print("every bad call raised RuntimeError")


if __name__ == "__main__":
    main()
