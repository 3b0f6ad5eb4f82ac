"""A/B latency of the small-message path between two source trees, interleaved in one run.

    python elasticpg/cli/latency_ab.py --old /path/to/old/tree --new /path/to/new/tree
                                       [--rounds 8] [--iters 3000] [--bytes 4] [--ranks 2]

Each round runs one short job per tree (order alternating from round to round): a fresh pair of
processes imports elasticpg from that tree (PYTHONPATH), runs warm-up calls, then --iters timed
all_reduce calls of --bytes bytes (float32, SUM) in batches, and reports the median batch's mean
per-call time (the max across ranks per batch) and the best batch's, and the CPU time (user +
system, all threads) rank 0's process spent per timed call. A burst of machine noise so hits both
trees alike; the table lists every round, then the median and best over rounds and the ratios
new / old (on a shared, loaded machine the best values are the stable ones).

This file is run as a script, not imported from the package, so that the old tree needs no copy
of it: the job imports only `elasticpg` and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH = 250  # calls per timed batch


def _rank(rank: int, world: int, port: int, iters: int, nbytes: int, out: dict) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import elasticpg  # noqa: F401 - registers the backend

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    t = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    for _ in range(1000):
        dist.all_reduce(t)
    import resource

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    means = []
    for _ in range(max(1, iters // BATCH)):
        t0 = time.perf_counter()
        for _ in range(BATCH):
            dist.all_reduce(t)
        took = torch.tensor([(time.perf_counter() - t0) / BATCH])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        means.append(took.item())
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if rank == 0:
        import elasticpg as e

        calls = max(1, iters // BATCH) * BATCH
        out["cpu"] = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / calls * 1e6

        out["us"] = statistics.median(means) * 1e6
        out["best"] = min(means) * 1e6
        out["file"] = e.__file__
    dist.destroy_process_group()


def _job(world: int, iters: int, nbytes: int) -> None:
    """One measurement with the elasticpg that PYTHONPATH names; prints one JSON line."""
    from datetime import timedelta

    import torch.distributed as dist
    import torch.multiprocessing as mp

    server = dist.TCPStore("127.0.0.1", 0, world, True, timedelta(seconds=60),
                           wait_for_workers=False)
    with mp.Manager() as manager:
        out = manager.dict()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, world, server.port, iters, nbytes, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise SystemExit(f"a rank failed (exit codes {bad})")
        print(json.dumps(dict(out)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="source tree whose elasticpg is 'old'")
    p.add_argument("--new", required=True, help="source tree whose elasticpg is 'new'")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--bytes", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.job:
        _job(a.ranks, a.iters, a.bytes)
        return 0
    trees = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    for name, path in trees.items():
        if not os.path.isdir(os.path.join(path, "elasticpg")):
            p.error(f"--{name} {path} has no elasticpg package")
    got: dict[str, list[float]] = {"old": [], "new": []}
    best: dict[str, list[float]] = {"old": [], "new": []}
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    print(f"{a.ranks} ranks, all_reduce {a.bytes} B, {a.iters} timed calls per job; us per call "
          f"(median batch of {BATCH} calls / best batch / rank 0's CPU per call)")
    print("round | first | old us                | new us")
    for k in range(a.rounds):
        order = ("old", "new") if k % 2 == 0 else ("new", "old")
        row = {}
        for name in order:
            env = dict(os.environ, PYTHONPATH=trees[name])
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--job",
                                  "--old", a.old, "--new", a.new, "--ranks", str(a.ranks),
                                  "--iters", str(a.iters), "--bytes", str(a.bytes)],
                                 env=env, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                print(res.stdout + res.stderr, file=sys.stderr)
                return 1
            data = json.loads(res.stdout.strip().splitlines()[-1])
            if not data["file"].startswith(trees[name]):
                print(f"the {name} job imported {data['file']}, not from {trees[name]}",
                      file=sys.stderr)
                return 1
            row[name] = data
            got[name].append(data["us"])
            best[name].append(data["best"])
            cpu[name].append(data.get("cpu", float("nan")))
        print(f"{k:5d} | {order[0]:>5} | {row['old']['us']:6.1f} / {row['old']['best']:5.1f} / "
              f"{row['old']['cpu']:5.1f} | {row['new']['us']:6.1f} / {row['new']['best']:5.1f} / "
              f"{row['new']['cpu']:5.1f}", flush=True)
    for what, vals in (("median of rounds", statistics.median),
                       ("best round", min)):
        mo, mn = vals(got["old"]), vals(got["new"])
        print(f"{what}: old {mo:.1f} us, new {mn:.1f} us, new/old {mn / mo:.3f}")
    mo, mn = min(best["old"]), min(best["new"])
    print(f"best batch: old {mo:.1f} us, new {mn:.1f} us, new/old {mn / mo:.3f}")
    mo, mn = statistics.median(cpu["old"]), statistics.median(cpu["new"])
    print(f"CPU per call (rank 0, median of rounds): old {mo:.1f} us, new {mn:.1f} us, "
          f"new/old {mn / mo:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
