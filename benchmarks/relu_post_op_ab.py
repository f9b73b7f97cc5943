"""The C++ CPU conv's ReLU as oneDNN's post-op against its ReLU pass (csrc/cpu/conv2d_relu.cpp,
relu_post_op_exact), on the VGG-16 and ResNet-50 layers where the post-op's rule applies, batch 4,
channels_last. Each setting runs in its own process (CNNKERNELS_CPU_RELU_POST_OP=1 or 0, read once
per process), alternating, --rounds times; a layer's figure is the best round's median.

    python benchmarks/relu_post_op_ab.py [--rounds 3] [--seconds 0.6]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (C, K, kernel, stride, H): the expansion convs, whose output outweighs their input and weight.
LAYERS = [(3, 64, 3, 1, 224), (3, 64, 7, 2, 224), (64, 64, 1, 1, 56), (64, 256, 1, 1, 56), (64, 64, 3, 1, 224),
          (128, 512, 1, 1, 28), (256, 1024, 1, 1, 14), (64, 128, 3, 1, 112), (512, 2048, 1, 1, 7)]


def measure(seconds):
    import torch

    import cnnkernels
    times = {}
    for dtype in (torch.bfloat16, torch.float32):
        for c, k, r, s, h in LAYERS:
            if dtype == torch.float32 and r == 3 and s == 1 and c >= 64:
                continue  # fp32 3x3 stride-1 convs with many channels run Winograd, with its own epilogue
            torch.manual_seed(0)
            x = torch.randn(4, c, h, h).to(dtype).contiguous(memory_format=torch.channels_last)
            w, b = (torch.randn(k, c, r, r) * 0.05).to(dtype), torch.randn(k).to(dtype)
            run = lambda: cnnkernels.conv2d_relu(x, w, b, stride=s, padding=r // 2)  # noqa: E731
            for _ in range(3):
                run()
            samples, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end or len(samples) < 5:
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            times[f"{str(dtype)[6:]} {c}>{k} {r}x{r} s{s} @{h}"] = statistics.median(samples) * 1e3
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.6, help="timing per layer and process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.seconds)))
        return
    runs = {"1": [], "0": []}
    for _ in range(args.rounds):
        for setting in runs:
            env = dict(os.environ, CNNKERNELS_CPU_RELU_POST_OP=setting)
            out = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(args.seconds)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
    import torch
    print(f"ReLU post-op vs ReLU pass, batch 4, channels_last, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; ms, best of {args.rounds} process medians")
    print(f"{'layer':30s} {'post-op':>8s} {'pass':>8s} {'speedup':>8s}")
    for layer in runs["1"][0]:
        post_op, relu_pass = (min(r[layer] for r in runs[s]) for s in ("1", "0"))
        print(f"{layer:30s} {post_op:8.3f} {relu_pass:8.3f} {relu_pass / post_op:7.2f}x")


if __name__ == "__main__":
    main()
