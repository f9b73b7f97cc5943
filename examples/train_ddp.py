"""Trains a cnnkernels zoo model on synthetic data with DistributedDataParallel.

One process per GPU (NCCL), or CPU processes (gloo) where there is no GPU:
    torchrun --nproc_per_node=2 examples/train_ddp.py --model resnet18 --steps 20
Several nodes: add --nnodes=N --node_rank=R --rdzv_endpoint=HOST:PORT to torchrun on each node.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from cnnkernels import models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a cnnkernels.models constructor")
    parser.add_argument("--batch", type=int, default=32, help="images per process and step")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local_rank >= torch.cuda.device_count():
        raise SystemExit(f"train_ddp.py: local rank {local_rank} needs GPU {local_rank}, but this node has "
                         f"{torch.cuda.device_count()}: run one process per GPU "
                         f"(torchrun --nproc_per_node={torch.cuda.device_count()})")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32

    model = getattr(models, args.model)(num_classes=1000).to(device, memory_format=torch.channels_last)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(rank)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch,), device=device, generator=generator)

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    steps = range(args.steps)
    if rank == 0 and tqdm is not None:
        steps = tqdm(steps, desc=f"{args.model} x{world}")
    start = None
    for step in steps:
        if step == 1:  # the first step pays for warm-up (cuDNN search, Triton compiles)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and tqdm is not None and (step % 10 == 0 or step == args.steps - 1):
            steps.set_postfix(loss=f"{loss.item():.4f}")  # .item() waits for the GPU: not every step
    if cuda:
        torch.cuda.synchronize()
    if rank == 0 and start is not None:
        rate = (args.steps - 1) * args.batch * world / (time.perf_counter() - start)
        print(f"{args.model}: {rate:.1f} images/s over {world} processes, final loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
