"""Two gloo processes apply one EMA codebook update to different data (run by tests/test_vqvae.py
as a subprocess: in-process DDP under pytest would re-run pytest). Each rank saves its codebook."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from pipeline.models.components.vq import VectorQuantizer

    torch.manual_seed(0)  # the same initial codebook on both ranks
    vq = VectorQuantizer(16, 4, ema=True, decay=0.9, dead_threshold=0.5).train()
    data = torch.randn(2, 3, 4, 5, 5, generator=torch.Generator().manual_seed(1))  # [rank, steps, D, H, W]
    for step in range(3):
        vq(data[rank, step][None])
    torch.save({"codebook": vq.codebook, "cluster_size": vq.cluster_size}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
