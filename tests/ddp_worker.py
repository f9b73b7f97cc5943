"""One rank of tests/test_training.py's DDP check: python ddp_worker.py RANK WORLD PORT STATE OUT."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training import TinyResNet, training_batch  # noqa: E402


def main(rank, world, port, state_path, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = TinyResNet()
        model.load_state_dict(torch.load(state_path))
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = training_batch()
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        nn.functional.cross_entropy(ddp(x[shard]), y[shard]).backward()
        torch.save([p.grad for p in model.parameters()], out_path)
        dist.barrier()  # neither rank tears down while the other still talks
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
