"""Winograd against the direct path on this CPU: the VGG-16 and ResNet-50 3x3 stride-1 layers at
batch 4 (fp32, channels_last), forward (conv2d_relu) and input gradient, best of several calls,
under each CNNKERNELS_CPU_WINOGRAD setting: 0 (direct: oneDNN), 1 (Winograd wherever the geometry
suits, the default before 2026-12-07) and unset (the default: each problem's first call times both
ways, later calls take the faster).

    python benchmarks/winograd_choice.py [--rounds 2] [--threads 2]

Each setting runs in a process of its own (the setting is read once), the settings alternating
round by round; a cell is the best over all rounds, in ms.
"""
import argparse
import json
import math
import os
import subprocess
import sys

# (in channels, out channels, height = width): the unique 3x3 stride-1 layers
LAYERS = [(64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56), (256, 512, 28),
          (512, 512, 28), (512, 512, 14),  # VGG-16
          (64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)]  # ResNet-50
SETTINGS = {"direct": "0", "winograd": "1", "measured": None}

CHILD = """
import json, sys, time, torch, cnnkernels
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
times = {}
for c, k, hw in json.loads(sys.argv[2]):
    x = torch.randn(4, c, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(k, c, 3, 3) / (9 * c) ** 0.5).contiguous(memory_format=torch.channels_last)
    b = torch.randn(k)
    calls = 4 if hw >= 112 else 10
    with cnnkernels.use_backend("cuda"):
        forward = []
        for _ in range(calls + 1):
            with torch.no_grad():
                start = time.perf_counter()
                cnnkernels.conv2d_relu(x, w, b, padding=1)
                forward.append(time.perf_counter() - start)
        out = cnnkernels.conv2d_relu(x, w, b, padding=1)
        grad = torch.ones_like(out)
        backward = []
        for _ in range(calls + 1):
            start = time.perf_counter()
            torch.autograd.grad(out, x, grad, retain_graph=True)
            backward.append(time.perf_counter() - start)
    # the first call of each is left out: by default it times both ways
    times[f"{c}>{k}@{hw}"] = [min(forward[1:]) * 1e3, min(backward[1:]) * 1e3]
print(json.dumps(times))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    best = {}
    for _ in range(args.rounds):
        for name, value in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k != "CNNKERNELS_CPU_WINOGRAD"}
            if value is not None:
                env["CNNKERNELS_CPU_WINOGRAD"] = value
            done = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), json.dumps(LAYERS)], env=env,
                                  capture_output=True, text=True, check=True)
            for layer, times in json.loads(done.stdout.splitlines()[-1]).items():
                cell = best.setdefault(layer, {}).setdefault(name, [float("inf")] * 2)
                cell[:] = [min(a, b) for a, b in zip(cell, times)]
    columns = "direct  winograd  measured"
    print(f"{'layer':>14} | {'forward ms: ' + columns:>38} | {'input gradient ms: ' + columns:>46}")
    for layer, cells in best.items():
        row = [f"{cells[name][i]:8.2f}" for i in (0, 1) for name in SETTINGS]
        print(f"{layer:>14} | {' '.join(row[:3]):>38} | {' '.join(row[3:]):>46}")
    for i, what in enumerate(["forward", "input gradient"]):
        def geomean_speedup(ms):  # over the layers, against the direct path
            return math.exp(sum(math.log(c["direct"][i] / ms(c)) for c in best.values()) / len(best))
        print(f"geometric mean over the {len(best)} layers, {what}, against direct: "
              f"winograd {geomean_speedup(lambda c: c['winograd'][i]):.2f}x, "
              f"measured {geomean_speedup(lambda c: c['measured'][i]):.2f}x, "
              f"the faster of direct and winograd per layer "
              f"{geomean_speedup(lambda c: min(c['direct'][i], c['winograd'][i])):.2f}x")


if __name__ == "__main__":
    main()
