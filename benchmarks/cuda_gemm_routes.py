"""The CUDA backend's GEMM routes against CUTLASS's conv kernel, timed in one GPU run.

The `cuda` backend runs every 1x1 unpadded conv (ResNet-50's strided downsampling convs over a
copy of every stride-th pixel) and every stem (fewer than 16 input channels, over its packed
windows) as CUTLASS's persistent GEMM. CNNKERNELS_CUDA_CONV=cutlass-conv runs the same convs on
CUTLASS's conv kernel instead, as they ran before the GEMM took them. This times both, and cuDNN's
fused op, on those layers of AlexNet, VGG-16 and ResNet-50: bf16, channels_last, CUDA-event
medians after warm-up (cnnkernels.bench.timing), cudnn.benchmark on. The verdict column says
which of our two is faster: if the conv kernel wins a layer class, csrc/cuda/conv.cu's routes
should leave it there.

    python benchmarks/cuda_gemm_routes.py [--batch 64] [--out FILE]
"""
import argparse
import math
import os
import sys

import torch

from cnnkernels.bench.contenders import layer_function, make_inputs
from cnnkernels.bench.report import geomean
from cnnkernels.bench.shapes import ALEXNET, RESNET50, VGG16
from cnnkernels.bench.timing import GpuTimer, rotating_sets

ROUTES = {"gemm": "cutlass", "conv_kernel": "cutlass-conv"}  # CNNKERNELS_CUDA_CONV for each
WRONG = 0.05  # max |ours - cuDNN| / max |cuDNN| above this is a wrong result (bf16 rounding is ~1e-2)


def gemm_route_layers():
    return [layer for layer in ALEXNET + VGG16 + RESNET50
            if (layer.kernel == 1 and layer.padding == 0) or layer.in_channels < 16]


def timed(timer, fn, sets):
    """(median us, output of the first set) of fn over the input sets."""
    out = fn(*sets[0]).clone()
    return timer.time(lambda i: fn(*sets[i]), n_sets=len(sets)).p50 * 1e3, out


def max_relative_error(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_gemm_routes.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    timer, dtype = GpuTimer(target_ms=50.0), torch.bfloat16
    elem = torch.finfo(dtype).bits // 8
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, channels_last, "
             f"batch {args.batch}; us per call (median), speed = cudnn_fused time / ours"]
    lines.append(f"{'layer':38s} {'cudnn_fused':>11s} {'gemm':>8s} {'conv_kern':>9s} {'gemm x':>7s} "
                 f"{'conv x':>7s}  {'faster':11s} {'max rel err (gemm, conv)':>24s}")
    print(lines[0], "\n" + lines[1], flush=True)
    ratios = {route: [] for route in ROUTES}
    wrong = []
    for layer in gemm_route_layers():
        sets = make_inputs(layer, args.batch, dtype, "cuda",
                           rotating_sets(layer.min_bytes(args.batch, elem), timer.l2_bytes))
        ref_us, ref = timed(timer, layer_function("cudnn_fused", layer, "cuda"), sets)
        ours = layer_function("cuda", layer, "cuda")
        times, errors = {}, {}
        for route, choice in ROUTES.items():
            os.environ["CNNKERNELS_CUDA_CONV"] = choice  # read by the C++ op on every call
            try:
                times[route], out = timed(timer, ours, sets)
                errors[route] = max_relative_error(out, ref)
                if not errors[route] <= WRONG:
                    wrong.append(f"{route} on {layer.label}")
                ratios[route].append(ref_us / times[route])
            except (RuntimeError, NotImplementedError) as error:  # e.g. no sm_90a build: say so, go on
                times[route], errors[route] = math.nan, math.nan
                print(f"  {route} on {layer.label}: {str(error).splitlines()[0][:160]}", flush=True)
        timed_routes = [r for r in times if not math.isnan(times[r])]
        faster = min(timed_routes, key=times.get) if timed_routes else "n/a"
        line = (f"{layer.label:38s} {ref_us:11.1f} {times['gemm']:8.1f} {times['conv_kernel']:9.1f} "
                f"{ref_us / times['gemm']:7.2f} {ref_us / times['conv_kernel']:7.2f}  {faster:11s} "
                f"{errors['gemm']:11.1e} {errors['conv_kernel']:11.1e}")
        lines.append(line)
        print(line, flush=True)
    for route, values in ratios.items():
        if values:
            lines.append(f"{route}: geomean {geomean(values):.3f}x cudnn_fused, lowest {min(values):.2f}x, {len(values)} layers")
            print(lines[-1])
    if wrong:
        lines.append("WRONG RESULTS: " + "; ".join(wrong))
        print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
