"""elasticpg-failover: how long the survivors take to resume after a rank crashes, hangs or dies
inside an operation (SPEC section 8: failure detection and resume time, crash and hang).

    elasticpg-failover [--ranks 4] [--trials 5] [--failure-timeout SECONDS] [--victim 1]
                       [--scenarios crash,hang,die_in_op] [--json PATH] [--markdown PATH]
    python -m elasticpg.cli.failover ...          (same thing)

How it measures, per scenario and trial (real processes, real sockets, elasticpg defaults:
auto-deactivate + auto-sync, so the failed operation returns only once the new view is applied):

* The parent process hosts a fresh TCPStore per trial on 127.0.0.1 at a kernel-chosen port. The
  ranks are a pool of processes started with torch.multiprocessing's "spawn" context; they
  survive from trial to trial, and the dead victim is replaced (and has finished importing torch)
  before the next trial starts, so process start-up never overlaps a measurement.
* Every rank initialises an elasticpg default group and runs --ops-before small all_reduces
  (the steady state; their median latency is reported for context). Then the victim fails:
  - crash: it writes time.time() to the store and calls os._exit(1), between two operations;
  - hang: it publishes its PID, writes time.time() and SIGSTOPs itself; once every survivor is
    done, the lowest surviving rank SIGKILLs it by PID (the parent checks, and kills it too
    if needed: no stopped process is left behind);
  - die_in_op: all ranks run a large all_reduce (--big-mb MiB of float32; one untimed warm-up
    first); right before it the victim arms threading.Timer(delay, ...) whose callback writes
    time.time() to the store and calls os._exit(1). The delay defaults to a quarter of the
    victim's warm-up duration of the same operation, so that the death usually falls inside it.
* The survivors keep running small all_reduces until get_active_ranks shows the hole, then
  --ops-after more. The failed operation is the survivors' first operation that the victim did
  not complete: for crash and hang the first one after the steady phase; for die_in_op the large
  all_reduce if it completed after the death, else the next one. Its resume time is
  (time.time() when it returned) - (the victim's failure timestamp); the trial's time is the max
  over survivors; the table shows the median and the max over trials, with the local_success
  of the failed operation and the active mask right after it.
* Every contribution is rank + 1, so every result is checked: before the failure it must be the
  full sum, after it the sum without the victim, and the failed operation must be one of the two
  (the full sum if local_success is True). Over shared memory a victim that dies inside the
  large all_reduce counts in the windows it completed and in none after (README, exclusion
  rule): that op may hold the full sum up to a window boundary and the partial sum from there.
  Differences are reported as anomalies (exit code 1).

Every wait is bounded: the survivors' loop, store waits and elasticpg operations by --timeout,
each trial by a deadline; on a timeout every child is SIGKILLed by PID and the command exits
with code 2 and a message that names the ranks that did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

from elasticpg.cli.launching import (
    HOST,
    check_output_dirs,
    comma_choices,
    command_line,
    cpu_count,
    host_meta,
    listen_store,
    oversubscription_note,
)
from elasticpg.cli.rank_pool import PoolTimeoutError, RankPool, kill_process
from elasticpg.cli.tables import Column, Table, num

SCENARIOS = ("crash", "hang", "die_in_op")
_K_TS = "failover/fail_ts"
_K_PID = "failover/victim_pid"
_K_DONE = "failover/done/"  # + rank


# ---- rank side --------------------------------------------------------------------------------

class _Ops:
    """Runs all_reduces of rank + 1 on the default group and records each one."""

    def __init__(self, rank: int, n: int) -> None:
        import torch
        import torch.distributed as dist

        import elasticpg

        self.torch, self.dist, self.epg = torch, dist, elasticpg
        self.rank, self.n = rank, n
        self.records: list[dict[str, Any]] = []

    def all_reduce(self, numel: int, tag: str) -> dict[str, Any]:
        torch, dist, epg = self.torch, self.dist, self.epg
        x = torch.full((numel,), float(self.rank + 1))
        t0 = time.time()
        p0 = time.perf_counter()
        work = dist.all_reduce(x, async_op=True)
        work.wait()
        p1 = time.perf_counter()
        t1 = time.time()
        first = float(x[0].item())
        values, counts = torch.unique_consecutive(x, return_counts=True)
        rec = {"tag": tag, "start": t0, "end": t1, "dur": p1 - p0, "value": first,
               "runs": list(zip(values[:4].tolist(), counts[:4].tolist(), strict=True)),
               "ok": epg.get_local_success(work),
               "hint": epg.get_failed_ranks_hint(work, self.n).tolist(),
               "mask": epg.get_active_ranks().tolist()}
        self.records.append(rec)
        return rec


def _run_trial(rank: int, world: int, port: int, job: dict[str, Any]) -> dict[str, Any]:
    from datetime import timedelta

    import torch.distributed as dist

    import elasticpg

    n, victim, scen = job["ranks"], job["victim"], job["scenario"]
    td = timedelta(seconds=job["timeout"])
    store = dist.TCPStore(HOST, job["port"], is_master=False, timeout=td)
    bench = dist.TCPStore(HOST, job["port"], is_master=False, timeout=td)  # the benchmark's keys
    opts = elasticpg.Options(host=HOST, failure_timeout=job["failure_timeout"])
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=n, timeout=td,
                            pg_options=opts)
    rt = getattr(dist.group.WORLD, "runtime", None)
    ops = _Ops(rank, n)
    for _ in range(job["ops_before"]):
        ops.all_reduce(job["small_elems"], "pre")
    if rank == victim:
        _victim_fails(ops, job)  # does not return
    if scen == "die_in_op":
        ops.all_reduce(job["big_elems"], "big_warmup")
        ops.all_reduce(job["big_elems"], "big")
    deadline = time.monotonic() + job["loop_seconds"]
    after_hole = None
    while True:
        rec = ops.all_reduce(job["small_elems"], "post")
        if after_hole is None and not rec["mask"][victim]:
            after_hole = 0
        elif after_hole is not None:
            after_hole += 1
        if after_hole is not None and after_hole >= job["ops_after"]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the active mask still shows rank {victim} after "
                               f"{job['loop_seconds']:.0f} s of all_reduces ({len(ops.records)} "
                               f"ops): {ops.records[-1]}")
    # every survivor finishes its loop before anyone kills the stopped victim or tears down
    survivors = [r for r in range(n) if r != victim]
    bench.set(f"{_K_DONE}{rank}", "1")
    bench.wait([f"{_K_DONE}{r}" for r in survivors], td)
    out: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "records": ops.records,
                           "failure_timeout": getattr(rt, "failure_timeout", None)}
    if scen == "hang" and rank == min(survivors):
        bench.wait([_K_PID], td)
        pid = int(bench.get(_K_PID))
        os.kill(pid, signal.SIGKILL)
        out["killed_pid"] = pid
    return out


def _victim_fails(ops: _Ops, job: dict[str, Any]) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    scen = job["scenario"]
    td = timedelta(seconds=job["timeout"])
    if scen == "crash":
        bench = dist.TCPStore(HOST, job["port"], is_master=False, timeout=td)
        bench.set(_K_TS, json.dumps({"ts": time.time()}))
        os._exit(1)
    if scen == "hang":
        bench = dist.TCPStore(HOST, job["port"], is_master=False, timeout=td)
        bench.set(_K_PID, str(os.getpid()))
        bench.set(_K_TS, json.dumps({"ts": time.time()}))
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(1)  # only if someone sent SIGCONT instead of SIGKILL
    # die_in_op
    warm = ops.all_reduce(job["big_elems"], "big_warmup")
    delay = job["die_delay"] if job["die_delay"] is not None else 0.25 * warm["dur"]
    death_store = dist.TCPStore(HOST, job["port"], is_master=False, timeout=td)
    state = {"op_returned": False}

    def die() -> None:
        ts = time.time()
        death_store.set(_K_TS, json.dumps({"ts": ts, "delay": delay,
                                           "victim_op_returned": state["op_returned"],
                                           "warmup_s": warm["dur"]}))
        os._exit(1)

    timer = threading.Timer(delay, die)
    timer.daemon = True
    timer.start()
    ops.all_reduce(job["big_elems"], "big")
    state["op_returned"] = True
    end = time.monotonic() + max(10.0, 2 * delay)
    while time.monotonic() < end:  # the timer kills us; bounded in case it does not
        time.sleep(0.01)
    os._exit(1)


# ---- parent side -------------------------------------------------------------------------------

def _short(results: dict[int, Any]) -> str:
    return ", ".join(f"rank {r}: {v[0]}" for r, v in sorted(results.items())) or "none"


# ---- analysis (pure) --------------------------------------------------------------------------

def _per_window(runs: list[tuple[float, int]], full: float, partial: float) -> bool:
    """Whether (value, count) runs are the full sum over whole shared-memory windows, then the
    partial sum: how a death inside a multi-window op shows (the exclusion rule)."""
    from elasticpg.transport.shm import window_bytes

    per_window = window_bytes() // 4  # float32 elements
    return (len(runs) == 2 and runs[0][0] == full and runs[1][0] == partial
            and runs[0][1] % per_window == 0)


def _full_and_partial(n: int, victim: int) -> tuple[float, float]:
    full = n * (n + 1) / 2
    return full, full - (victim + 1)


def failed_op_index(records: list[dict[str, Any]], scenario: str, ts: float,
                    victim: int) -> int:
    """Index (in one survivor's records) of the first operation the victim did not complete.

    crash, hang: the first operation after the steady phase. die_in_op: the large all_reduce,
    unless it was over at this rank before the death, or it completed with the victim's
    contribution and without a view change (the victim died after serving this rank): then
    the next one.
    """
    first = next(i for i, r in enumerate(records) if r["tag"] in ("big", "post"))
    if scenario == "die_in_op":
        big = records[first]
        if big["end"] <= ts or (big["ok"] and big["mask"][victim]):
            return first + 1
    return first


def analyse_trial(scenario: str, n: int, victim: int, ts_info: dict[str, Any] | None,
                  survivors: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-trial numbers and anomalies from the survivors' records and the failure timestamp."""
    full, partial = _full_and_partial(n, victim)
    anomalies: list[str] = []
    trial: dict[str, Any] = {"per_rank": {}, "anomalies": anomalies}
    if ts_info is None:
        anomalies.append("the victim wrote no failure timestamp")
        return trial
    ts = ts_info["ts"]
    trial["fail_ts"] = ts
    if scenario == "die_in_op":
        trial["die_delay_s"] = ts_info.get("delay")
        trial["victim_op_returned"] = ts_info.get("victim_op_returned")
        trial["big_warmup_s"] = ts_info.get("warmup_s")
    counts = set()
    for r, res in sorted(survivors.items()):
        recs = res["records"]
        counts.add(len(recs))
        i = failed_op_index(recs, scenario, ts, victim)
        op = recs[i]
        hole = next((j for j, x in enumerate(recs) if not x["mask"][victim]), None)
        pre = [x["dur"] for x in recs if x["tag"] == "pre"]
        steady = pre[min(5, len(pre) // 2):]  # skip the first few (connection warm-up)
        trial["per_rank"][r] = {
            "resume_s": op["end"] - ts, "failed_op": op["tag"], "failed_op_index": i,
            "started_before_failure_s": ts - op["start"], "local_success": op["ok"],
            "hint": op["hint"], "mask_after": op["mask"], "value": op["value"],
            "hole_seen_after_op": hole, "steady_op_s": statistics.median(steady) if steady
            else None, "failure_timeout": res.get("failure_timeout"),
            "die_inside_op": (op["tag"] == "big") if scenario == "die_in_op" else None,
            "killed_pid": res.get("killed_pid"),
            "ok_with_partial_sum": bool(op["ok"] and op["value"] == partial),
            "started_after_failure": op["start"] > ts}
        warm = next((x for x in recs if x["tag"] == "big_warmup"), None)
        if warm is not None:
            trial["per_rank"][r]["big_warmup_op_s"] = warm["dur"]
        big = next((x for x in recs if x["tag"] == "big"), None)
        if big is not None:
            trial["per_rank"][r]["big_op_s"] = big["dur"]
            trial["per_rank"][r]["big_op_end_minus_death_s"] = big["end"] - ts
        # correctness of every result
        for j, x in enumerate(recs):
            what = f"rank {r} op {j} ({x['tag']})"
            if len(x["runs"]) > 1 and not (j == i and _per_window(x["runs"], full, partial)):
                anomalies.append(f"{what}: result not uniform across elements, nor the full "
                                 f"sum in whole windows then the partial sum: {x['runs']}")
            if j < i:
                if x["value"] != full or not x["ok"] or x["mask"][victim] != 1:
                    anomalies.append(f"{what} before the failure: value {x['value']} (want "
                                     f"{full}), ok={x['ok']}, mask {x['mask']}")
            elif j == i:
                # local_success=True with the partial sum is legitimate: the view without the
                # victim may take effect at this op's boundary, before any transfer to it
                if x["value"] not in (full, partial):
                    anomalies.append(f"{what}, the failed op: value {x['value']} with "
                                     f"local_success={x['ok']} (want {partial}, or {full} if "
                                     f"the victim's contribution arrived whole)")
                if scenario != "die_in_op" and x["value"] != partial:
                    anomalies.append(f"{what}: the victim died before this op but its "
                                     f"contribution counted (value {x['value']})")
            elif j > i and x["mask"][victim] == 0 and x["value"] != partial:
                anomalies.append(f"{what} after the hole: value {x['value']} (want {partial})")
        if hole is None:
            anomalies.append(f"rank {r}: the active mask never lost rank {victim}")
        elif hole != i:
            anomalies.append(f"rank {r}: the hole appeared after op {hole}, the failed op is "
                             f"{i} (auto-sync should apply the view before the failed op returns)")
        if op["end"] < ts:
            anomalies.append(f"rank {r}: the failed op returned before the failure timestamp")
    if len(counts) > 1:
        anomalies.append(f"survivors ran different numbers of ops: {sorted(counts)}")
    masks = {tuple(v["mask_after"]) for v in trial["per_rank"].values()}
    if len(masks) > 1:
        anomalies.append(f"survivors disagree about the mask after the failed op: {masks}")
    # SPEC 4 allows survivors to disagree about the failed op (a contribution counts at a
    # rank iff it arrived there whole); record when they did
    idx = {v["failed_op_index"] for v in trial["per_rank"].values()}
    vals = {v["value"] for v in trial["per_rank"].values()}
    trial["results_disagree"] = len(idx) == 1 and len(vals) > 1
    per = trial["per_rank"].values()
    trial["resume_s"] = max(v["resume_s"] for v in per)
    trial["resume_spread_s"] = trial["resume_s"] - min(v["resume_s"] for v in per)
    steadies = [v["steady_op_s"] for v in per if v["steady_op_s"] is not None]
    trial["steady_op_s"] = max(steadies) if steadies else None
    return trial


def _counted(values: list[Any]) -> str:
    """'False' when all equal, else 'False x3, True x2'."""
    distinct: dict[str, int] = {}
    for v in values:
        distinct[str(v)] = distinct.get(str(v), 0) + 1
    if len(distinct) == 1:
        return next(iter(distinct))
    return ", ".join(f"{k} x{c}" for k, c in sorted(distinct.items(), key=lambda kv: -kv[1]))


def summarize(scenario: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [t for t in trials if "resume_s" in t]
    resumes = [t["resume_s"] for t in ok]
    per = [v for t in ok for v in t["per_rank"].values()]
    steady = [t["steady_op_s"] for t in ok if t.get("steady_op_s") is not None]
    s: dict[str, Any] = {
        "scenario": scenario, "trials": len(trials), "measured": len(ok),
        "median_resume_ms": statistics.median(resumes) * 1e3 if resumes else None,
        "max_resume_ms": max(resumes) * 1e3 if resumes else None,
        "min_resume_ms": min(resumes) * 1e3 if resumes else None,
        "local_success": _counted([v["local_success"] for v in per]),
        "mask_after": _counted([v["mask_after"] for v in per]),
        "hint": _counted([v["hint"] for v in per]),
        "steady_op_us": statistics.median(steady) * 1e6 if steady else None,
        "anomalies": sum(len(t["anomalies"]) for t in trials),
        "ok_with_partial_sum": sum(1 for v in per if v["ok_with_partial_sum"]),
        "ok_with_partial_sum_started_after": sum(1 for v in per if v["ok_with_partial_sum"]
                                                 and v["started_after_failure"]),
        "results_disagree": sum(1 for t in ok if t.get("results_disagree")),
        "max_spread_ms": max(t["resume_spread_s"] for t in ok) * 1e3 if ok else None,
        "failed_ops": len(per),
    }
    if scenario == "die_in_op":
        s["died_inside_op"] = sum(1 for t in ok if t.get("victim_op_returned") is False)
        s["survivor_ops_cut"] = sum(1 for v in per if v["die_inside_op"])
        s["survivor_ops"] = len(per)
        warm = [max(v["big_warmup_op_s"] for v in t["per_rank"].values()) for t in ok]
        s["big_op_ms"] = statistics.median(warm) * 1e3 if warm else None
    return s


# ---- output -------------------------------------------------------------------------------------

TABLE = Table(Column("scenario", left=True), Column("median resume ms"),
              Column("max resume ms"), Column("local_success of the failed op", left=True),
              Column("mask after", left=True), Column("steady op us"))


def _row(s: dict[str, Any]) -> list[str]:
    return [s["scenario"], num(s["median_resume_ms"], ".1f"), num(s["max_resume_ms"], ".1f"),
            s["local_success"], s["mask_after"], num(s["steady_op_us"], ".0f")]


def table_text(summary: list[dict[str, Any]]) -> str:
    return TABLE.text([_row(s) for s in summary])


def notes_text(summary: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    out = [f"failure_timeout in effect: {meta['failure_timeout_effective']} s "
           f"({'--failure-timeout' if meta['failure_timeout'] else 'elasticpg default'}); "
           f"resume = survivors' failed all_reduce returned - victim's failure timestamp, "
           f"max over survivors, median/max over {meta['trials']} trials; steady op = median "
           f"latency of a {meta['small_bytes']} B all_reduce before the failure"]
    spreads = ", ".join(f"{s['scenario']} {s['max_spread_ms']:.1f} ms" for s in summary
                        if s["max_spread_ms"] is not None)
    if spreads:
        out.append(f"largest gap between the first and the last survivor to resume in one "
                   f"trial: {spreads}")
    for s in summary:
        if s["ok_with_partial_sum"]:
            out.append(f"{s['scenario']}: {s['ok_with_partial_sum']}/{s['failed_ops']} failed "
                       f"ops returned local_success=True (empty hint) without the victim's "
                       f"contribution; {s['ok_with_partial_sum_started_after']} of them started "
                       f"after the victim had died (the view without it took effect at that "
                       f"op's boundary on that rank)")
        if s["results_disagree"]:
            out.append(f"{s['scenario']}: in {s['results_disagree']}/{s['measured']} trials the "
                       f"survivors' results of the failed op differ (the victim's contribution "
                       f"arrived whole at some survivors only; allowed by SPEC section 4)")
        if s["scenario"] == "die_in_op":
            if s["big_op_ms"] is not None:
                out.append(f"die_in_op: the {meta['big_mb']:g} MiB all_reduce takes "
                           f"{s['big_op_ms']:.0f} ms without a failure (warm-up call, max over "
                           f"survivors, median over trials); its resume time includes finishing "
                           f"the transfers among the survivors")
            out.append(f"die_in_op: the victim died inside its {meta['big_mb']:g} MiB all_reduce "
                       f"in {s['died_inside_op']}/{s['measured']} trials; the survivors' large "
                       f"op was the failed one in {s['survivor_ops_cut']}/{s['survivor_ops']} "
                       f"cases (otherwise the next small op)")
    return out


def markdown_text(meta: dict[str, Any], summary: list[dict[str, Any]]) -> str:
    out = [f"**elasticpg failover** - `{meta['command']}` - {meta['ranks']} ranks (victim rank "
           f"{meta['victim']}), {meta['trials']} trials per scenario, torch "
           f"{meta['torch_version']}, {meta['date']}, {meta['platform']}, {meta['cpus']} CPUs.",
           "", TABLE.markdown([_row(s) for s in summary])]
    out.append("")
    out.extend(f"* {x}" for x in notes_text(summary, meta))
    return "\n".join(out) + "\n"


# ---- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elasticpg-failover",
        description="Measure how long elasticpg's survivors take to resume after a rank "
                    "crashes, hangs (SIGSTOP) or dies inside a large all_reduce.")
    p.add_argument("--ranks", "-n", type=int, default=4, help="number of ranks (default 4)")
    p.add_argument("--trials", type=int, default=5, help="trials per scenario (default 5)")
    p.add_argument("--scenarios", type=comma_choices(SCENARIOS, "scenario"),
                   default=list(SCENARIOS),
                   help=f"comma-separated, default all: {','.join(SCENARIOS)}")
    p.add_argument("--victim", type=int, default=1, help="the rank that fails (default 1)")
    p.add_argument("--failure-timeout", type=float, default=None,
                   help="elasticpg.Options(failure_timeout=...) in seconds (default: elasticpg's "
                        "own default)")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="elasticpg per-operation timeout and bound on every wait of the "
                        "benchmark, in seconds (default 20)")
    p.add_argument("--ops-before", type=int, default=50,
                   help="small all_reduces before the failure (default 50)")
    p.add_argument("--ops-after", type=int, default=2,
                   help="small all_reduces after the hole appears (default 2)")
    p.add_argument("--small-elems", type=int, default=1,
                   help="float32 elements of the small all_reduce (default 1)")
    p.add_argument("--big-mb", type=float, default=16.0,
                   help="MiB of float32 of the die_in_op all_reduce (default 16)")
    p.add_argument("--die-delay", type=float, default=None,
                   help="die_in_op: seconds from arming the timer to the death (default: a "
                        "quarter of the victim's warm-up time of the same all_reduce)")
    p.add_argument("--json", metavar="PATH", help="write the summary and every trial as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.ranks < 2:
        p.error("--ranks must be at least 2")
    if not 0 <= a.victim < a.ranks:
        p.error("--victim must be a rank in [0, --ranks)")
    if a.trials < 1 or a.ops_before < 1 or a.ops_after < 0 or a.small_elems < 1:
        p.error("--trials, --ops-before and --small-elems must be >= 1, --ops-after >= 0")
    if a.timeout <= 0 or a.big_mb <= 0:
        p.error("--timeout and --big-mb must be positive")
    if a.failure_timeout is not None and a.failure_timeout <= 0:
        p.error("--failure-timeout must be positive")
    if a.die_delay is not None and a.die_delay < 0:
        p.error("--die-delay must be >= 0")
    check_output_dirs(p, a.json, a.markdown)


def _one_trial(pool: RankPool, args: argparse.Namespace, scenario: str, trial: int
               ) -> dict[str, Any]:
    store, port = listen_store(args.ranks, args.timeout)
    ft = args.failure_timeout
    job = {"scenario": scenario, "trial": trial, "port": port, "ranks": args.ranks,
           "victim": args.victim, "timeout": args.timeout, "failure_timeout": ft,
           "ops_before": args.ops_before, "ops_after": args.ops_after,
           "small_elems": args.small_elems, "big_elems": int(args.big_mb * (1 << 20)) // 4,
           "die_delay": args.die_delay,
           # the survivors' loop: detection (failure_timeout, default <= 3 s) plus slack
           "loop_seconds": args.timeout}
    bound = 3 * args.timeout + 30
    try:
        ranks = pool.run_raw(_run_trial, job, world=args.ranks, timeout=bound, port=port,
                             victim=args.victim)
        res = {r: (x.status, x.value) for r, x in enumerate(ranks)}
        ts_info = json.loads(store.get(_K_TS)) if store.check([_K_TS]) else None
    finally:
        del store
    errors = {r: v for r, v in res.items()
              if v[0] == "error" or (r != args.victim and v[0] != "ok")}
    vstat = res.get(args.victim, ("?", None))
    if errors:
        last = {r: ([ln for ln in str(v[1]).strip().splitlines() if ln.strip()] or [""])[-1]
                for r, v in errors.items()}
        text = "; ".join(f"rank {r}: {v[0]}: {last[r]}" for r, v in sorted(errors.items()))
        trial_out: dict[str, Any] = {
            "per_rank": {}, "anomalies": [f"rank(s) {sorted(errors)} failed: {text}"],
            "errors": {r: f"{v[0]}: {v[1]}" for r, v in errors.items()}}
    else:
        survivors = {r: v[1] for r, v in res.items() if r != args.victim}
        trial_out = analyse_trial(scenario, args.ranks, args.victim, ts_info, survivors)
    trial_out["victim_status"] = list(vstat)
    if vstat[0] == "left alive":
        trial_out["anomalies"].append(f"victim rank {args.victim}: {vstat[1]}")
    trial_out["scenario"], trial_out["trial"] = scenario, trial
    return trial_out


def _progress(t: dict[str, Any]) -> str:
    if "resume_s" not in t:
        return f"# {t['scenario']:<9} trial {t['trial']}: NOT MEASURED"
    per = " ".join(f"r{r}={v['resume_s'] * 1e3:.1f}" for r, v in sorted(t["per_rank"].items()))
    ok = _counted([v["local_success"] for v in t["per_rank"].values()])
    extra = ""
    if t["scenario"] == "die_in_op":
        extra = (f", delay {t['die_delay_s'] * 1e3:.1f} ms, victim op "
                 f"{'returned' if t['victim_op_returned'] else 'cut'}")
    return (f"# {t['scenario']:<9} trial {t['trial']}: resume {t['resume_s'] * 1e3:8.1f} ms "
            f"({per}), local_success {ok}, victim {t['victim_status'][0]} "
            f"({t['victim_status'][1]}){extra}"
            + (f", {len(t['anomalies'])} ANOMALIES" if t["anomalies"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    import torch

    t_start = time.perf_counter()
    cpus = cpu_count()
    meta: dict[str, Any] = {
        "command": command_line("elasticpg-failover", "elasticpg.cli.failover", argv),
        "ranks": args.ranks, "victim": args.victim,
        "trials": args.trials, "scenarios": args.scenarios,
        "failure_timeout": args.failure_timeout, "timeout": args.timeout,
        "ops_before": args.ops_before, "ops_after": args.ops_after,
        "small_bytes": 4 * args.small_elems, "big_mb": args.big_mb,
        "die_delay": args.die_delay, **host_meta(cpus),
    }
    oversub = oversubscription_note(args.ranks, cpus)
    print(f"# elasticpg-failover: {meta['command']}\n"
          f"# {args.ranks} ranks (victim rank {args.victim}), {args.trials} trial(s) per "
          f"scenario, torch {torch.__version__}, {meta['date']}, {meta['platform']}, {cpus} "
          f"CPUs, 1 intra-op thread/rank{oversub}", flush=True)

    trials: list[dict[str, Any]] = []
    pool = None
    try:
        pool = RankPool(args.ranks)
        print(f"# {args.ranks} rank processes ready after {time.perf_counter() - t_start:.1f} s",
              flush=True)
        for scenario in args.scenarios:
            for k in range(args.trials):
                t = _one_trial(pool, args, scenario, k)
                trials.append(t)
                print(_progress(t), flush=True)
                for a in t["anomalies"]:
                    print(f"#   ANOMALY: {a}", flush=True)
                if scenario != args.scenarios[-1] or k != args.trials - 1:
                    pool.revive()
    except PoolTimeoutError as exc:
        print(f"elasticpg-failover: FAILED (timeout): {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("elasticpg-failover: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if pool is not None:
            pool.close()
            left = [pid for pid in pool.pids() if _alive(pid)]
            if left:
                print(f"elasticpg-failover: WARNING: rank processes {left} still alive after "
                      f"close; SIGKILLing them", file=sys.stderr, flush=True)
                for pid in left:
                    kill_process(pid)

    fts = {v.get("failure_timeout") for t in trials for v in t["per_rank"].values()}
    meta["failure_timeout_effective"] = (fts.pop() if len(fts) == 1
                                         else sorted(fts, key=str) or args.failure_timeout)
    summary = [summarize(s, [t for t in trials if t["scenario"] == s]) for s in args.scenarios]
    elapsed = time.perf_counter() - t_start
    meta["total_seconds"] = elapsed
    print("\n" + table_text(summary), flush=True)
    for line in notes_text(summary, meta):
        print(f"# {line}", flush=True)
    n_anom = sum(len(t["anomalies"]) for t in trials)
    print(f"# total wall time {elapsed:.1f} s (including process start-up); "
          f"{n_anom} anomalies", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "summary": summary, "trials": trials}, fh, indent=1,
                      default=str)
            fh.write("\n")
        print(f"# wrote {args.json}", flush=True)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(markdown_text(meta, summary))
        print(f"# wrote {args.markdown}", flush=True)
    if n_anom:
        print(f"elasticpg-failover: {n_anom} anomalies (wrong results, masks or ops); see above",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie that nobody reaped is not alive for our purpose
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


if __name__ == "__main__":
    raise SystemExit(main())
