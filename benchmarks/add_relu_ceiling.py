"""How close add_relu can come to issue 2's CPU target (2x eager torch.relu(x + y)).

Our add_relu reads two tensors and writes one: torch.add's memory traffic. Eager is torch.add
plus a ReLU pass over its result, so eager / torch.add bounds what any one-pass add_relu can
reach against eager. Float32, channels_last, batch 4, the ResNet-50 add shapes, on the CPU.

    python benchmarks/add_relu_ceiling.py
"""
import timeit

import torch

import cnnkernels


def main():
    torch.set_grad_enabled(False)
    compiled = torch.compile(lambda a, b: torch.relu(a + b))
    print(f"us per call, best of 15 interleaved rounds x 50 calls, {torch.get_num_threads()} threads")
    print(f"{'shape':14s} {'torch.add':>10s} {'relu(x+y)':>10s} {'ours':>10s} {'compile':>10s}"
          "  relu(x+y)/add  relu(x+y)/ours")
    for c, h in [(256, 56), (512, 28), (1024, 14), (2048, 7)]:
        x = torch.randn(4, c, h, h).contiguous(memory_format=torch.channels_last)
        y = torch.randn_like(x)
        assert torch.equal(cnnkernels.add_relu(x, y), torch.relu(x + y))
        compiled(x, y)  # compile before timing
        contenders = {"add": lambda: torch.add(x, y), "eager": lambda: torch.relu(x + y),
                      "ours": lambda: cnnkernels.add_relu(x, y), "compile": lambda: compiled(x, y)}
        best = dict.fromkeys(contenders, float("inf"))
        for _ in range(15):
            for name, fn in contenders.items():
                best[name] = min(best[name], timeit.timeit(fn, number=50) / 50 * 1e6)
        print(f"{c}x{h}x{h:<6d} {best['add']:10.1f} {best['eager']:10.1f} {best['ours']:10.1f} "
              f"{best['compile']:10.1f}  {best['eager'] / best['add']:13.2f}  {best['eager'] / best['ours']:14.2f}")


if __name__ == "__main__":
    main()
