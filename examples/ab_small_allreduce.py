"""A/B: small-message all_reduce latency of two elasticpg source trees, side by side in one run.

    python examples/ab_small_allreduce.py BEFORE_TREE AFTER_TREE [MORE_TREES...] [--rounds 6]

Each tree gets its own ranks (processes started once, importing elasticpg from that tree via
PYTHONPATH); the rounds rotate through the trees (one running, the others idle in a store wait),
so drifting machine load hits all alike. Per round and tree: the mean latency of `--iters`
all_reduce calls of one float32 (slowest rank). Prints each tree's median and best round and
its ratio to the first tree. Naming the same tree twice (A B B) shows what the noise alone
gives. Used to check what the metrics counters cost on the hot path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from datetime import timedelta

WORKER = r"""
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
torch.set_num_threads(1)
import elasticpg
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
iters, rounds = int(sys.argv[4]), int(sys.argv[5])
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))
dist.init_process_group("elasticpg", store=store, rank=rank, world_size=world,
                        timeout=timedelta(seconds=120))
t = torch.ones(1)
for _ in range(200):
    dist.all_reduce(t)
for i in range(rounds):
    store.wait([f"go/{i}"], timedelta(seconds=300))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    store.set(f"done/{i}/{rank}", repr((time.perf_counter() - t0) / iters))
dist.destroy_process_group()
"""


def main() -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", help="source trees; the first is the baseline")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--iters", type=int, default=3000)
    args = ap.parse_args()
    trees = {f"{i}": os.path.abspath(t) for i, t in enumerate(args.trees)}
    stores, procs = {}, []
    try:
        for name, tree in trees.items():
            store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=300))
            stores[name] = store
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
            for r in range(args.ranks):
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(r), str(args.ranks), str(store.port),
                     str(args.iters), str(args.rounds)], env=env, cwd="/"))
        results: dict[str, list[float]] = {n: [] for n in trees}
        for i in range(args.rounds):
            names = list(trees)
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                store = stores[name]
                store.set(f"go/{i}", "1")
                keys = [f"done/{i}/{r}" for r in range(args.ranks)]
                store.wait(keys, timedelta(seconds=300))
                results[name].append(max(float(store.get(k)) for k in keys))
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"all_reduce of 1 float32, {args.ranks} ranks, {args.iters} calls x {args.rounds} "
          f"rounds per tree (slowest rank per round)")
    base = statistics.median(results["0"])
    for name, xs in results.items():
        med = statistics.median(xs)
        print(f"  [{name}] {trees[name]}: median {med * 1e6:7.2f} us (x{med / base:.3f}), best "
              f"{min(xs) * 1e6:7.2f} us, rounds {[round(x * 1e6, 1) for x in xs]}")


if __name__ == "__main__":
    main()
