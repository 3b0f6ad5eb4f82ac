"""Deferred-join timings (SPEC section 8, issue "elastic membership"), with real processes.

N founders serve (one small all_reduce per step) while a replacement for slot 1 starts, warms
up in isolation for --warmup seconds and calls join_group; the founders poll get_peer_state
every step and call recover_ranks once it turns True. Reported per trial:

* baseline step: the founders' median step latency before the joiner exists (slot 1 left
  already, so one rank fewer than after the join);
* full-strength step: the same with every founder serving, before slot 1 leaves: the baseline
  to compare the step after the join with (same number of ranks; on a machine with fewer
  cores than ranks one more rank alone makes a step markedly slower);
* worst step during warm-up: the founders' slowest step while the joiner warms up;
* admission stall: how long recover_ranks blocks the founders;
* admission pause: what the healthy ranks really lose to the admission: recover_ranks plus
  their first step with the joiner, minus a normal step (that first collective is where new
  links, mapped memory and the joiner's own catching up would show);
* ready visible: from the joiner's join_group call to get_peer_state turning True;
* start to active: from the joiner's process start (before `import torch`) to join_group
  returning, and the same minus its warm-up.

    python -m elasticpg.cli.joinbench [--ranks 4] [--trials 3] [--warmup 1.0]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from datetime import timedelta
from typing import Any

from elasticpg.cli.launching import HOST, listen_store
from elasticpg.cli.tables import Column, Table


def _founder(rank: int, world: int, port: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    import elasticpg

    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    t = torch.ones(1)

    def step() -> float:
        t.fill_(1.0)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        return time.perf_counter() - t0

    full = [step() for _ in range(200)]  # every founder serves: the rank count after the join
    if rank == 1:  # the slot the joiner will take: leave gracefully after a warm start
        elasticpg.deactivate_ranks(None, [1])
        dist.destroy_process_group()
        return
    elasticpg.deactivate_ranks(None, [1])
    base = [step() for _ in range(200)]
    store.set(f"founder{rank}-serving", "1")
    store.wait(["joiner-started"], timedelta(seconds=60))
    worst, stall, seen = 0.0, None, None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        worst = max(worst, step())
        if elasticpg.get_peer_state(None, [1]) == [True]:
            seen = time.time()
            t0 = time.perf_counter()
            res = elasticpg.recover_ranks(None, [1])
            stall = time.perf_counter() - t0
            first = step()  # the first step with the joiner
            break
    if stall is None or res.status.value != "Applied":
        raise RuntimeError("the joiner was not admitted within 60 s")
    after = [step() for _ in range(200)]  # as many as the baselines
    out.put((rank, {"baseline": statistics.median(base), "full": statistics.median(full),
                    "worst": worst, "stall": stall,
                    "pause": stall + first - statistics.median(base), "seen": seen,
                    "after": statistics.median(after)}))
    dist.destroy_process_group()


def _joiner(world: int, port: int, warmup: float, started: float, out: Any) -> None:
    import torch
    import torch.distributed as dist

    import elasticpg

    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))
    store.set("joiner-started", "1")
    dist.init_process_group("elasticpg", store=store, rank=1, world_size=world,
                            timeout=timedelta(seconds=60),
                            pg_options=elasticpg.Options(is_extension=True))
    t = torch.ones(1)
    end = time.monotonic() + warmup
    while time.monotonic() < end:  # "warm-up": local collectives only
        dist.all_reduce(t)
    called = time.time()
    elasticpg.join_group()
    active = time.time()
    t = torch.ones(1)
    for _ in range(200):
        t.fill_(1.0)
        dist.all_reduce(t)
    if t.item() != world:
        raise RuntimeError(f"after joining, all_reduce gave {t.item()}, expected {world}")
    out.put((-1, {"called": called, "start_to_active": active - started}))
    dist.destroy_process_group()


def _trial(world: int, warmup: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    store, port = listen_store(world + 1, 120.0)
    out = ctx.Queue()
    procs = [ctx.Process(target=_founder, args=(r, world, port, out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    # start the joiner only once the founders serve: its clock then measures its own start-up
    store.wait([f"founder{r}-serving" for r in range(world) if r != 1], timedelta(seconds=120))
    started = time.time()
    joiner = ctx.Process(target=_joiner, args=(world, port, warmup, started, out), daemon=True)
    joiner.start()
    procs.append(joiner)
    results: dict[int, dict] = {}
    deadline = time.monotonic() + 120
    try:
        while len(results) < world and time.monotonic() < deadline:  # founders 0,2,.. + joiner
            try:
                rank, value = out.get(timeout=1.0)
            except Exception:  # noqa: BLE001 - queue.Empty: check the children
                codes = {p.name: p.exitcode for p in procs if p.exitcode not in (None, 0)}
                if codes:
                    raise RuntimeError(f"benchmark process(es) failed: exit codes {codes} "
                                       f"(tracebacks above)") from None
                continue
            results[rank] = value
        if len(results) < world:
            raise RuntimeError("trial did not finish within 120 s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    j = results.pop(-1)
    founders = list(results.values())
    return {
        "baseline_step_ms": 1e3 * statistics.median(f["baseline"] for f in founders),
        "worst_step_during_warmup_ms": 1e3 * max(f["worst"] for f in founders),
        "admission_stall_ms": 1e3 * max(f["stall"] for f in founders),
        "admission_pause_ms": 1e3 * max(f["pause"] for f in founders),
        "ready_visible_ms": 1e3 * (max(f["seen"] for f in founders) - j["called"]),
        "start_to_active_s": j["start_to_active"],
        "start_to_active_minus_warmup_s": j["start_to_active"] - warmup,
        "full_strength_step_ms": 1e3 * statistics.median(f["full"] for f in founders),
        "step_after_join_ms": 1e3 * statistics.median(f["after"] for f in founders),
        "after_join_over_full_strength": statistics.median(f["after"] / f["full"]
                                                           for f in founders),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4, help="founders, one of them replaced")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0, help="joiner's isolated warm-up (s)")
    ap.add_argument("--json", help="write all trials here")
    a = ap.parse_args(argv)
    if a.ranks < 2 or a.trials < 1 or a.warmup < 0:
        ap.error("need --ranks >= 2, --trials >= 1, --warmup >= 0")
    trials = [_trial(a.ranks, a.warmup) for _ in range(a.trials)]
    print(f"# deferred join: {a.ranks} ranks, slot 1 replaced, warm-up {a.warmup:g} s, "
          f"{a.trials} trials (median / max)")
    table = Table(Column("metric", left=True), Column("median"), Column("max"))
    print(table.text([[key, f"{statistics.median(t[key] for t in trials):.2f}",
                       f"{max(t[key] for t in trials):.2f}"] for key in trials[0]]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(trials, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
