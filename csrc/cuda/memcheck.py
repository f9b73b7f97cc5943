"""Runs every CUDA kernel of csrc/cuda at small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python csrc/cuda/memcheck.py

Without the caching allocator every tensor is its own cudaMalloc, so an access past a tensor's
end is an error instead of a silent read of a neighbour. Each result is also compared with a
float64 reference, and the script exits non-zero when one is wrong. `--only generic` (or
add_relu, relu_backward, cutlass) narrows it, e.g. for `compute-sanitizer --tool racecheck`, which is slower.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import cnnkernels  # noqa: F401  (loads cnnkernels._C)
from cnnkernels import _extension

ops = torch.ops.cnnkernels
failures = []


def check(name, out, ref, tol):
    err = ((out.double().cpu() - ref).nan_to_num(0).norm() / ref.nan_to_num(0).norm().clamp_min(1e-30)).item()
    ok = err <= tol and torch.equal(out.isnan().cpu(), ref.isnan())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {err:.2e}")
    if not ok:
        failures.append(name)


def layout(t, name):
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "sliced":
        n, c, h, w = t.shape
        big = torch.zeros(n, c + 1, h, w + 1, dtype=t.dtype, device=t.device)
        view = big.contiguous(memory_format=torch.channels_last)[:, 1:, :, 1:]
        view.copy_(t)
        return view
    return t.contiguous()


TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def run_add_relu():
    for dtype in TOL:
        for n, offset in ((1, 0), (1027, 0), (70000, 0), (1027, 1)):  # offset 1: the unaligned kernel
            a = torch.randn(n + offset, device="cuda", dtype=dtype)[offset:]
            b = torch.randn(n + offset, device="cuda", dtype=dtype)[offset:]
            check(f"add_relu {dtype} n={n} offset={offset}", ops.add_relu(a, b),
                  torch.relu(a.double() + b.double()).cpu(), TOL[dtype])


def run_relu_backward():
    # (N, C, H, W): the 16-byte paths (C or H*W a multiple of 8), odd C and H*W (the scalar paths),
    # H*W == 1 (NCHW read as channels_last), an NCHW plane large enough to be split into chunks,
    # and an empty batch. "sliced" is copied to a dense channels_last tensor first.
    shapes = [(2, 64, 7, 8), (2, 3, 5, 7), (1, 67, 9, 1), (3, 5, 1, 1), (1, 2, 256, 256), (0, 3, 4, 4)]
    for dtype in TOL:
        for shape in shapes:
            for fmt in ("nchw", "channels_last", "sliced"):
                grad = layout(torch.randn(shape, device="cuda", dtype=dtype), fmt)
                output = torch.randn(shape, device="cuda", dtype=dtype)
                output.view(-1)[: min(1, output.numel())] = float("nan")  # passes grad through
                output = layout(output, fmt)
                ref = torch.ops.aten.threshold_backward(grad.double().cpu(), output.double().cpu(), 0)
                grad_pre_relu, grad_bias = ops.relu_backward_bias_grad(grad, output)
                name = f"relu_backward_bias_grad {dtype} {shape} {fmt}"
                check(name + " grad_pre_relu", grad_pre_relu, ref, 0)
                check(name + " grad_bias", grad_bias, ref.sum((0, 2, 3)), TOL[dtype])
                again = ops.relu_backward_bias_grad(grad, output)[1]
                if not torch.equal(grad_bias.view(torch.uint8), again.view(torch.uint8)):
                    print(f"FAIL {name}: grad_bias differs between two runs")
                    failures.append(name + " deterministic")


def run_conv(kernel, dtype, shape, fmt, residual, bias=True):
    n, c, h, w, k, r, stride, pad, dil, groups = shape
    x = layout(torch.randn(n, c, h, w, device="cuda", dtype=dtype), fmt)
    weight = (torch.randn(k, c // groups, r, r, device="cuda") / (c // groups * r * r) ** 0.5).to(dtype)
    b = torch.randn(k, device="cuda", dtype=dtype) if bias else None
    ref = F.conv2d(x.double().cpu(), weight.double().cpu(), None if b is None else b.double().cpu(),
                   stride, pad, dil, groups)
    geometry = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    os.environ["CNNKERNELS_CUDA_CONV"] = kernel
    if residual:
        res = layout(torch.randn(ref.shape, device="cuda", dtype=dtype), fmt)
        out = ops.conv2d_add_relu(x, weight, res, b, *geometry)
        ref = ref + res.double().cpu()
    else:
        out = ops.conv2d_relu(x, weight, b, *geometry)
    check(f"conv {kernel} {dtype} {shape} {fmt} residual={residual} bias={bias}", out, torch.relu(ref), TOL[dtype])


# (N, C, H, W, K, kernel, stride, padding, dilation, groups)
GENERIC_SHAPES = [(2, 5, 9, 7, 70, 3, 1, 1, 1, 1), (1, 6, 11, 11, 4, 5, 2, 2, 2, 2),
                  (2, 4, 7, 7, 8, 3, 1, 1, 1, 4), (1, 3, 13, 13, 5, 11, 4, 2, 1, 1)]
# The 3- and 8-channel ones run as 1x1 convs over packed windows; 20 channels are padded to 24;
# the 1x1 with 96 outputs, the 128-output stem and the stride-2 1x1 with 72 outputs (over its
# subsampled input) run the persistent GEMM's 128-wide tile, the 64-output stem and the 1x1 with 40
# outputs its 64-wide one.
CUTLASS_SHAPES = [(2, 16, 9, 7, 24, 3, 1, 1, 1, 1), (1, 3, 17, 17, 64, 7, 2, 3, 1, 1),
                  (1, 136, 6, 6, 200, 3, 1, 1, 1, 1), (1, 8, 12, 12, 16, 3, 1, 2, 2, 1),
                  (1, 20, 9, 9, 24, 3, 1, 1, 1, 1), (2, 32, 7, 9, 96, 1, 1, 0, 1, 1),
                  (1, 3, 12, 12, 128, 3, 1, 1, 1, 1), (2, 20, 13, 13, 72, 1, 2, 0, 1, 1),
                  (1, 72, 9, 7, 40, 1, 1, 0, 1, 1)]


def run_generic():
    for dtype in TOL:
        for shape in GENERIC_SHAPES:
            for fmt in ("nchw", "channels_last", "sliced"):
                run_conv("generic", dtype, shape, fmt, residual=fmt != "nchw", bias=fmt != "sliced")


def run_cutlass():
    if "cuda:conv_cutlass_sm90_bf16" not in _extension.module().kernels:
        print("skip cutlass: the extension was built without CUTLASS")
        return
    if torch.cuda.get_device_capability() != (9, 0):
        print("skip cutlass: not an sm_90 GPU")
        return
    for dtype in (torch.bfloat16, torch.float16):
        for shape in CUTLASS_SHAPES:
            for fmt in ("channels_last", "nchw"):
                run_conv("cutlass", dtype, shape, fmt, residual=fmt == "channels_last", bias=shape[1] != 136)
    # A stem's windows packed and run 2 images per pass (9x9 windows of 152 columns each), the last short.
    os.environ["CNNKERNELS_CUDA_STEM_PASS_BYTES"] = str(2 * 9 * 9 * 152 * 2)
    for dtype in (torch.bfloat16, torch.float16):
        run_conv("cutlass", dtype, (3, 3, 17, 17, 64, 7, 2, 3, 1, 1), "channels_last", residual=True)
    del os.environ["CNNKERNELS_CUDA_STEM_PASS_BYTES"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["add_relu", "relu_backward", "generic", "cutlass"])
    args = parser.parse_args()
    if not torch.cuda.is_available() or not _extension.has_cuda_kernels():
        sys.exit(f"needs a GPU and cnnkernels._C with CUDA kernels ({_extension.problem()})")
    runs = {"add_relu": run_add_relu, "relu_backward": run_relu_backward, "generic": run_generic,
            "cutlass": run_cutlass}
    for name, run in runs.items():
        if args.only in (None, name):
            run()
    torch.cuda.synchronize()
    if failures:
        sys.exit(f"{len(failures)} wrong results: {failures}")
    print("all results right")


if __name__ == "__main__":
    main()
