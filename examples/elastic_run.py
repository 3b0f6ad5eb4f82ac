"""A serving loop that survives the SIGKILL of any worker, under `elasticpg run`.

    elasticpg run --nproc-per-node 4 examples/elastic_run.py --kill-rank 1 --kill-after 3

Rank 1 SIGKILLs itself after 3 s of serving (or kill any worker yourself: `kill -9 <pid>`,
the launcher prints every worker's pid). The others notice inside that step and keep serving;
the launcher restarts only rank 1, as a replacement that warms up in isolation (its collectives
are local) and then joins; the healthy ranks admit it between two steps and all serve again.

The script is written as for torchrun (`init_process_group` with env://), plus two elasticpg
lines: a replacement calls `join_group` after its warm-up, and every healthy rank calls
`admit_ready_ranks` once per step. `--report DIR` writes what each process measured
(DIR/rank<R>-<restart>.json): serving steps per 100 ms, steps longer than 5 ms, the admission
stall, the replacement's warm-up and join times.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before importing torch: the replacement's "process start"

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import elasticpg  # noqa: E402


def warm_up(seconds: float) -> None:
    """Stand-in for loading a model (here: sleeping) and capturing graphs (a fixed number of
    collectives: the founding ranks run these together). In a replacement every collective
    runs over itself only and never touches the live group."""
    time.sleep(seconds)
    for _ in range(20):
        dist.all_reduce(torch.ones(1024))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0,
                   help="serve this long, and then on while a slot is being refilled ...")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="... but no longer than this")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds")
    p.add_argument("--step-ms", type=float, default=1.0,
                   help="the model's work per step (simulated by sleeping)")
    p.add_argument("--kill-rank", type=int, default=-1,
                   help="this rank's first worker SIGKILLs itself ...")
    p.add_argument("--kill-after", type=float, default=3.0, help="... after this many seconds")
    p.add_argument("--report", default=None, help="directory for per-process JSON reports")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("elasticpg", timeout=timedelta(seconds=60))  # env://, as torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    me = {"rank": rank, "restarts": int(os.environ.get("ELASTICPG_RESTART_COUNT", "0")),
          "pid": os.getpid(), "replacement": elasticpg.is_replacement(), "started": STARTED}
    me["warmup_start"] = time.time()
    warm_up(args.warmup)
    me["warmup_end"] = time.time()
    if elasticpg.is_replacement():
        elasticpg.join_group()  # blocks until the healthy ranks admit us between two steps
        me["joined"] = time.time()
        print(f"joined as a replacement {me['joined'] - STARTED:.2f} s after process start: "
              f"active={elasticpg.get_active_ranks().tolist()}", flush=True)

    begin = time.monotonic()
    per_tick: dict[int, int] = {}  # serving steps completed per 100 ms of wall-clock time
    slow: list[tuple[float, float]] = []  # (end time, seconds) of steps longer than 5 ms
    stalls: list[float] = []  # seconds spent in admit_ready_ranks when it admitted someone
    steps, worst = 0, 0.0
    while True:
        elapsed = time.monotonic() - begin
        if rank == args.kill_rank and not elasticpg.is_replacement() \
                and elapsed > args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.step_ms / 1e3)  # the model's work
        active = elasticpg.get_active_ranks()
        done = elapsed >= args.seconds and bool(active.all()) or elapsed >= args.max_seconds
        t = torch.tensor([1.0, float(done)])
        t0 = time.perf_counter()
        work = dist.all_reduce(t, async_op=True)  # [contributors, anyone done?]
        work.wait()
        dt = time.perf_counter() - t0
        if elasticpg.get_local_success(work) and t[0].item() != active.sum().item():
            raise RuntimeError(f"step {steps}: {t[0].item():g} contributions, "
                               f"{active.sum().item()} active")
        t0 = time.perf_counter()
        admitted = elasticpg.admit_ready_ranks()  # collective: same step on every member
        if admitted:
            stalls.append(time.perf_counter() - t0)
            print(f"step {steps}: admitted rank(s) {admitted} in {stalls[-1] * 1e3:.1f} ms; "
                  f"active={elasticpg.get_active_ranks().tolist()}", flush=True)
        if not elasticpg.get_local_success(work):
            failed = elasticpg.get_failed_ranks_hint(work, world).nonzero().flatten().tolist()
            print(f"step {steps}: rank(s) {failed} failed inside this all_reduce "
                  f"({dt * 1e3:.1f} ms); serving on with "
                  f"{int(elasticpg.get_active_ranks().sum())} ranks", flush=True)
        now = time.time()
        per_tick[int(now * 10)] = per_tick.get(int(now * 10), 0) + 1
        worst = max(worst, dt)
        if dt > 5e-3:
            slow.append((now, dt))
        steps += 1
        if t[1].item() > 0:
            break
    dist.barrier()
    print(f"served {steps} steps; worst all_reduce {worst * 1e3:.1f} ms", flush=True)
    dist.destroy_process_group()
    if args.report:
        me.update(steps=steps, per_tick=per_tick, slow=slow, stalls=stalls)
        path = os.path.join(args.report, f"rank{rank}-{me['restarts']}.json")
        with open(path, "w") as f:
            json.dump(me, f)


if __name__ == "__main__":
    main()
