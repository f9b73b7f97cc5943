"""The fused train-mode BN (+ residual) + ReLU, forward and backward, at ResNet-50 shapes (batch
128, bf16, channels_last), for each tile size its per-channel kernels could use, against eager
BatchNorm2d (+ add) + ReLU: which TILE_ELEMENTS (cnnkernels/triton_ops/relu_backward.py) to keep.

With 1024-element tiles and 4 warps each thread has one 16-byte load in flight per loop step,
likely too few to saturate HBM; larger tiles hold more (no spills up to 4096: checked with
tests/triton_hopper_compile.py's machinery). GPU only; times are triton.testing.do_bench
medians of forward + backward, after a warm-up that compiles each tile's kernels.

    python benchmarks/bn_tiles.py [--tiles 1024,2048,4096]
"""
import argparse

import torch
import torch.nn as nn

# (channels, height = width, count in ResNet-50, residual): the BNs that end a bottleneck add the
# residual; one shape per channel-block class (64: one 64-wide block; more: 128-wide blocks).
SHAPES = [(64, 56, 6, False), (256, 56, 3, True), (512, 28, 4, True), (2048, 7, 3, True)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", default="1024,2048,4096")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bn_tiles.py needs a CUDA GPU")
    import triton.testing

    from cnnkernels.triton_ops import batch_norm, relu_backward

    tiles = [int(t) for t in args.tiles.split(",")]
    print(f"fused BN (+ residual) + ReLU, forward + backward, batch {args.batch}, bf16, channels_last, "
          f"{torch.cuda.get_device_name()}; ms (do_bench median)")
    print(f"{'C x HW':>12s} {'count':>5s} {'eager':>8s} " + " ".join(f"{'tile ' + str(t):>10s}" for t in tiles))
    totals = [0.0] * (len(tiles) + 1)
    for channels, hw, count, residual in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)

        def make():
            t = torch.randn(args.batch, channels, hw, hw, device="cuda", dtype=torch.bfloat16, generator=gen)
            return t.contiguous(memory_format=torch.channels_last)
        x, res, grad = make(), make() if residual else None, make()
        bn = nn.BatchNorm2d(channels).to("cuda", torch.bfloat16)
        x.requires_grad_()

        def eager():
            y = bn(x)
            out = torch.relu(y + res if residual else y)
            out.backward(grad)

        def fused():
            out = batch_norm.batch_norm_relu_train(x, bn.weight, bn.bias, res, bn.eps, bn.running_mean,
                                                   bn.running_var, 0.1)
            out.backward(grad)

        row = [triton.testing.do_bench(eager, warmup=10, rep=50, return_mode="median")]
        for tile in tiles:
            relu_backward.TILE_ELEMENTS = tile
            relu_backward._WALKS.clear()
            row.append(triton.testing.do_bench(fused, warmup=10, rep=50, return_mode="median"))
        totals = [t + count * ms for t, ms in zip(totals, row)]
        print(f"{channels:>5d} x {hw:>3d}² {count:>5d} " + " ".join(f"{ms:>8.3f}" if i == 0 else f"{ms:>10.3f}"
                                                                  for i, ms in enumerate(row)), flush=True)
    print(f"{'weighted sum':>18s} " + " ".join(f"{ms:>8.2f}" if i == 0 else f"{ms:>10.2f}"
                                              for i, ms in enumerate(totals)))


if __name__ == "__main__":
    main()
