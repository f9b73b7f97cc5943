"""The CUDA backend's GEMM routes against CUTLASS's conv kernel, timed in one GPU run.

The `cuda` backend runs every 1x1 unpadded conv (ResNet-50's strided downsampling convs over a
copy of every stride-th pixel) and every stem (fewer than 16 input channels, over its packed
windows) as CUTLASS's persistent GEMM. CNNKERNELS_CUDA_CONV=cutlass-conv runs the same convs on
CUTLASS's conv kernel instead, as they ran before the GEMM took them. This times both, and cuDNN's
fused op, on those layers of AlexNet, VGG-16 and ResNet-50: bf16, channels_last, CUDA-event
medians after warm-up (cnnkernels.bench.timing), cudnn.benchmark on. The verdict column says
which of our two is faster: if the conv kernel wins a layer class, csrc/cuda/conv.cu's routes
should leave it there.

A stem's windows are packed and run a few images per pass, CNNKERNELS_CUDA_STEM_PASS_BYTES at a
time (64 MiB unless set, chosen for memory). A second table times the stems' GEMM route over a
sweep of pass sizes, at the given batch and at 256: the default should become the fastest.

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
STEM_PASS_MIB = [4, 8, 16, 32, 64, 2**20]  # 2**20 MiB: every image in one pass


def gemm_route_layers():
    return [layer for layer in ALEXNET + VGG16 + RESNET50
            if (layer.kernel == 1 and layer.padding == 0) or layer.in_channels < 16]


def timed(timer, fn, sets):
    """(median us, output of the first set) of fn over the input sets."""
    out = fn(*sets[0]).clone()
    return timer.time(lambda i: fn(*sets[i]), n_sets=len(sets)).p50 * 1e3, out


def max_relative_error(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def stem_pass_sweep(timer, dtype, elem, batches, lines):
    """Times each stem's GEMM route per pass size; appends the table to `lines`, returns what was wrong."""
    names = [f"{mib} MiB" for mib in STEM_PASS_MIB[:-1]] + ["one pass"]
    header = "stem passes, us per call (median) by CNNKERNELS_CUDA_STEM_PASS_BYTES"
    lines += ["", header, f"{'layer':38s} {'batch':>5s} " + " ".join(f"{name:>8s}" for name in names) + "  fastest"]
    print("\n".join(lines[-3:]), flush=True)
    os.environ["CNNKERNELS_CUDA_CONV"] = "cutlass"
    wrong = []
    for layer in [layer for layer in gemm_route_layers() if layer.in_channels < 16]:
        for batch in batches:
            sets = make_inputs(layer, batch, dtype, "cuda",
                               rotating_sets(layer.min_bytes(batch, elem), timer.l2_bytes))
            ref = layer_function("cudnn_fused", layer, "cuda")(*sets[0])
            ours, times = layer_function("cuda", layer, "cuda"), []
            for mib in STEM_PASS_MIB:
                os.environ["CNNKERNELS_CUDA_STEM_PASS_BYTES"] = str(mib << 20)
                try:
                    us, out = timed(timer, ours, sets)
                except (RuntimeError, NotImplementedError) as error:
                    print(f"  {mib} MiB on {layer.label}: {str(error).splitlines()[0][:160]}", flush=True)
                    us, out = math.nan, ref
                times.append(us)
                if not max_relative_error(out, ref) <= WRONG:
                    wrong.append(f"stem passes of {mib} MiB on {layer.label} at batch {batch}")
            valid = [(t, name) for t, name in zip(times, names) if not math.isnan(t)]
            fastest = min(valid)[1] if valid else "n/a"
            lines.append(f"{layer.label:38s} {batch:5d} " + " ".join(f"{t:8.1f}" for t in times) + f"  {fastest}")
            print(lines[-1], flush=True)
    del os.environ["CNNKERNELS_CUDA_STEM_PASS_BYTES"]
    return wrong


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
    wrong += stem_pass_sweep(timer, dtype, elem, [args.batch, 256], lines)
    if wrong:
        lines.append("WRONG RESULTS: " + "; ".join(wrong))
        print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
