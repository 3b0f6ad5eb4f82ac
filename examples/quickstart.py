"""elasticpg quickstart: the ordinary torch.distributed calls, on the "elasticpg" backend.

Run it directly (spawns 4 local ranks, tcp:// rendezvous on a free port):
    python examples/quickstart.py
or under torchrun (env:// rendezvous):
    torchrun --standalone --nproc-per-node 4 examples/quickstart.py
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import elasticpg


def work(rank: int, world: int) -> None:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)  # 0 + 1 + ... + (world-1)
    gathered = torch.zeros(world, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(gathered, torch.tensor([rank * 1.5], dtype=torch.bfloat16))
    # uneven all_to_all: rank r sends j+1 values to rank j
    send = torch.cat([torch.full((j + 1,), rank * 10 + j) for j in range(world)])
    recv = torch.zeros(world * (rank + 1), dtype=torch.int64)
    dist.all_to_all_single(recv, send, [rank + 1] * world, [j + 1 for j in range(world)])
    # a ring of point-to-point messages
    right, left = (rank + 1) % world, (rank - 1) % world
    got = torch.zeros(1)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.tensor([rank * 100.0]), right),
                                   dist.P2POp(dist.irecv, got, left)])
    for r in reqs:
        r.wait()
    print(f"rank {rank}: all_reduce={t.item():g} all_gather={gathered.tolist()} "
          f"all_to_all={recv.tolist()} from_left={got.item():g} "
          f"active={elasticpg.get_active_ranks().tolist()}", flush=True)
    dist.barrier()


def spawned(rank: int, world: int, port: int) -> None:
    dist.init_process_group("elasticpg", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        work(rank, world)
    finally:
        dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ:  # launched by torchrun: env:// rendezvous
        dist.init_process_group("elasticpg")
        try:
            work(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = int(os.environ.get("WORLD", "4"))
    mp.spawn(spawned, args=(world, port), nprocs=world)


if __name__ == "__main__":
    main()
