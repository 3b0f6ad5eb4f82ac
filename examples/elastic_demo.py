"""elasticpg demo: a serving loop that survives a crash and admits a replacement.

Four ranks serve "requests" (one all_reduce per step). Rank 1 is SIGKILLed mid-run; the
survivors notice at once and keep serving over three ranks. A replacement process for slot 1
starts, warms up in isolation (its collectives are local and never touch the live group) and
calls join_group; the survivors see it ready through get_peer_state, admit it with
recover_ranks, and from the next step on all four ranks serve again. Every step is checked.

    python examples/elastic_demo.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
from datetime import timedelta

STEPS_BEFORE_KILL = 300
STEPS_AFTER_JOIN = 200  # everyone, the replacement included, runs exactly this many more
WORLD = 4


def say(who: str, msg: str) -> None:
    t0 = float(os.environ["DEMO_T0"])  # the launcher's clock, shared by every process
    print(f"[{time.time() - t0:6.2f}s] {who:12s} {msg}", flush=True)


def serve(rank: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    import elasticpg

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    who = f"rank {rank}"
    if rank == 0:
        say(who, f"serving with {WORLD} ranks")
    store.set(f"pid{rank}", str(os.getpid()))
    step, worst, admitted, left = 0, 0.0, False, STEPS_AFTER_JOIN
    give_up = time.monotonic() + 120  # a bound in time: a step takes well under a millisecond
    while left > 0:
        t = torch.tensor([float(rank + 1)])
        t0 = time.perf_counter()
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        dt = time.perf_counter() - t0
        worst = max(worst, dt) if step > 5 else worst
        active = elasticpg.get_active_ranks().tolist()
        expected = float(sum(r + 1 for r, a in enumerate(active) if a))
        if elasticpg.get_local_success(work) and t.item() != expected:
            raise RuntimeError(f"step {step}: got {t.item()}, expected {expected}")
        if not elasticpg.get_local_success(work) and rank == 0:
            failed = elasticpg.get_failed_ranks_hint(work, WORLD).nonzero().flatten().tolist()
            say(who, f"step {step}: rank(s) {failed} failed inside this all_reduce "
                     f"({dt * 1e3:.1f} ms); survivors continue, active={active}")
        if rank == 0 and step == STEPS_BEFORE_KILL:
            store.set("kill-now", "1")
        if step == STEPS_BEFORE_KILL and rank != 1:
            store.add("survivors-at-kill", 1)
        if not admitted and step > STEPS_BEFORE_KILL and not active[1]:
            if elasticpg.get_peer_state(None, [1]) == [True]:
                t0 = time.perf_counter()
                res = elasticpg.recover_ranks(None, [1])
                if rank == 0:
                    say(who, f"step {step}: replacement ready -> recover_ranks: "
                             f"{res.status.value}, epoch {res.new_epoch}, the healthy ranks "
                             f"stalled {1e3 * (time.perf_counter() - t0):.1f} ms")
                admitted = True
        if admitted and active == [1] * WORLD:
            left -= 1
        step += 1
        if time.monotonic() > give_up:
            raise RuntimeError(f"demo did not converge within 120 s ({step} steps)")
    if rank == 0:
        say(who, f"back to {sum(active)} ranks; worst step while the replacement warmed up "
                 f"and joined: {worst * 1e3:.1f} ms")
    store.wait(["replacement-done"], timedelta(seconds=60))
    dist.destroy_process_group()


def replacement(port: int) -> None:
    started = time.time()
    import torch
    import torch.distributed as dist

    import elasticpg

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("elasticpg", store=store, rank=1, world_size=WORLD,
                            timeout=timedelta(seconds=60),
                            pg_options=elasticpg.Options(is_extension=True))
    who = "replacement"
    t = torch.tensor([2.0])
    dist.all_reduce(t)
    say(who, f"started as slot 1, isolated: all_reduce([2]) = {t.item():g} (local only)")
    t_end = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < t_end:  # stand-in for model load / warm-up / graph capture
        dist.all_reduce(torch.ones(1024))
        n += 1
    say(who, f"warm-up done ({n} isolated collectives); calling join_group")
    elasticpg.join_group()
    say(who, f"active {time.time() - started:.2f} s after process start; "
             f"mask={elasticpg.get_active_ranks().tolist()}")
    t = torch.tensor([2.0])
    for _ in range(STEPS_AFTER_JOIN):
        t.fill_(2.0)
        dist.all_reduce(t)
        if t.item() != sum(range(1, WORLD + 1)):
            raise RuntimeError(f"replacement: all_reduce gave {t.item()}")
    store.set("replacement-done", "1")
    dist.destroy_process_group()


def main() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the store lives in this launcher, so no worker is special and it survives any death
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    os.environ["DEMO_T0"] = str(time.time())  # inherited by the spawned processes
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=serve, args=(r, port)) for r in range(WORLD)]
    for p in procs:
        p.start()
    store.wait(["kill-now"], timedelta(seconds=120))
    pid1 = int(store.get("pid1"))
    os.kill(pid1, signal.SIGKILL)
    say("launcher", f"SIGKILLed rank 1 (pid {pid1})")
    store.wait(["survivors-at-kill"], timedelta(seconds=60))
    rep = ctx.Process(target=replacement, args=(port,))
    rep.start()
    say("launcher", "started a replacement process for slot 1")
    deadline = time.monotonic() + 120
    for p in [*procs, rep]:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    stuck = [p.pid for p in [*procs, rep] if p.is_alive()]
    for pid in stuck:
        os.kill(pid, signal.SIGKILL)
    bad = [p.exitcode for p in [*procs[:1], *procs[2:], rep] if p.exitcode != 0]
    if stuck or bad:
        raise SystemExit(f"demo failed: stuck={stuck} exit codes={bad}")
    say("launcher", "demo finished: every step checked, no rank stopped serving")


if __name__ == "__main__":
    main()
