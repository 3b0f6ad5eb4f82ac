"""elasticpg-bench: nccl-tests style benchmark of elasticpg side by side with gloo, in one run.

    elasticpg-bench [--ranks 2] [--ops all_reduce,broadcast,...] [--min-bytes 4]
                    [--max-bytes 67108864] [--factor 4] [--target-seconds 0.2]
                    [--json PATH] [--markdown PATH]
    python -m elasticpg.cli.bench ...          (same thing)

How it measures (SPEC section 8):

* N rank processes are spawned (torch.multiprocessing, "spawn"). Each creates a gloo default
  group (used only to coordinate the benchmark) and two measured subgroups over all ranks: one
  gloo and one elasticpg, so both backends run in the same processes, on the same data.
* For every (op, size) one iteration of each backend runs on identical random inputs and
  elasticpg's output is compared with gloo's (exact for data movement, allclose for
  reductions); a difference aborts the run with an error: a benchmark of wrong results is
  worthless.
* Then both backends are timed. Each gets one untimed call and a few warm-up calls (which also
  estimate its per-call time), then about --target-seconds of synchronous calls (between
  --min-iters and --max-iters in all), split into --rounds loops that alternate with the other
  backend's loops; which backend goes first alternates from one size to the next. So a burst of
  machine noise hits both alike. A loop is timed with time.perf_counter and its time is the max
  across ranks (gloo all_reduce MAX), so all ranks agree on iteration counts and results. The
  reported time per call is the best loop's mean (mean and median over loops go to --json).
* nccl-tests conventions: algbw = bytes / time; busbw = algbw x 2(n-1)/n for all_reduce,
  (n-1)/n for all_gather / reduce_scatter / all_to_all, 1 for broadcast. "bytes" is the tensor
  size for all_reduce / broadcast / all_to_all, the output size for all_gather and the input
  size for reduce_scatter. Data type float32; all_reduce and reduce_scatter use SUM.
* ratio = elasticpg time / gloo time (lower is better); speedup = gloo time / elasticpg time.

Everything listens on 127.0.0.1 only: the rendezvous store on a port the kernel picks, gloo through
the loopback interface (GLOO_SOCKET_IFNAME, unless already set) and elasticpg through
Options(host="127.0.0.1"). Intra-op threads per rank default to cores / ranks, so that ranks do
not fight for cores. A failing rank makes the command exit non-zero and print that rank's error.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from elasticpg.cli.launching import (
    check_output_dirs,
    comma_choices,
    command_line,
    cpu_count,
    host_meta,
    listen_store,
    oversubscription_note,
)
from elasticpg.cli.tables import Column, Table, num

OPS = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all", "barrier")
BACKENDS = ("elasticpg", "gloo")
_ALIASES = {
    "allreduce": "all_reduce",
    "allgather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "reducescatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "alltoall": "all_to_all",
    "all_to_all_single": "all_to_all",
    "bcast": "broadcast",
}
_ELEM = 4  # bytes per float32 element
_GB = 1e9  # GB/s as in nccl-tests


class ResultMismatchError(RuntimeError):
    """elasticpg produced a result that differs from gloo's for the same inputs."""


# ---- pure helpers (no torch.distributed) -----------------------------------------------------

def busbw_factor(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if op == "broadcast":
        return 1.0
    return 0.0  # barrier: no payload


def _factor_label(op: str) -> str:
    return {"all_reduce": "2(n-1)/n", "broadcast": "1", "barrier": "n/a"}.get(op, "(n-1)/n")


def geometry(op: str, nominal_bytes: int, n: int) -> tuple[int, int]:
    """(element count of the nccl-tests "bytes" tensor, its size in bytes) for a nominal size.

    all_gather / reduce_scatter / all_to_all need a count divisible by n: it is rounded down
    (and up to at least n), as nccl-tests does, and the actual byte count is what is reported.
    """
    if op == "barrier":
        return 0, 0
    count = max(1, nominal_bytes // _ELEM)
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        count = max(n, count // n * n)
    return count, count * _ELEM


def size_list(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= factor
    return sizes


def human_bytes(b: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:.4g} {unit}"
    return f"{b} B"


def _clamp(v: float, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, v)))


# ---- table rendering (rank 0) -----------------------------------------------------------------

ROWS = Table(Column("size", 11), Column("count", 10), Column("elasticpg us", 12),
             Column("algbw GB/s", 10), Column("busbw GB/s", 10), Column("gloo us", 11),
             Column("algbw GB/s", 10), Column("busbw GB/s", 10), Column("ratio e/g", 9),
             Column("speedup g/e", 11))
ROWS_MD = Table(Column("size"), Column("elasticpg time (µs)"), Column("elasticpg busbw (GB/s)"),
                Column("gloo time (µs)"), Column("gloo busbw (GB/s)"), Column("ratio (e/g)"),
                Column("speedup (g/e)"))
SUMMARY = Table(Column("op", 16, left=True), Column("sizes", 6), Column("geomean", 9),
                Column("smallest", 9), Column("largest", 9), Column("largest size", 13))
SUMMARY_MD = Table(Column("op", left=True), Column("geomean ratio"),
                   Column("ratio at smallest size"), Column("ratio at largest size"))


def _size(row: dict[str, Any]) -> str:
    return "-" if row["op"] == "barrier" else human_bytes(row["bytes"])


def table_header(op: str, n: int) -> str:
    f = busbw_factor(op, n)
    what = {"all_reduce": ", SUM", "reduce_scatter": ", SUM", "broadcast": ", root 0"}.get(op, "")
    if op == "barrier":
        desc = f"# barrier - {n} ranks"
    else:
        desc = (f"# {op} - float32{what}, {n} ranks; busbw = algbw x {f:.3f} "
                f"[{_factor_label(op)}]")
    return desc + "\n" + ROWS.header()


def table_row(row: dict[str, Any]) -> str:
    cells = [_size(row), str(row["count"])]
    for b in BACKENDS:
        r = row[b]
        cells += [num(r["time_us"], ".1f"), num(r["algbw_gbps"], ".3f"),
                  num(r["busbw_gbps"], ".3f")]
    return ROWS.row(cells + [f"{row['ratio']:.2f}", f"{row['speedup']:.2f}"])


def summarize(rows: list[dict[str, Any]], ops: list[str]) -> list[dict[str, Any]]:
    out = []
    for op in ops:
        rs = [r for r in rows if r["op"] == op]
        if not rs:
            continue
        geo = math.exp(sum(math.log(r["ratio"]) for r in rs) / len(rs))
        out.append({"op": op, "sizes": len(rs), "geomean_ratio": geo,
                    "ratio_smallest": rs[0]["ratio"], "ratio_largest": rs[-1]["ratio"],
                    "bytes_largest": rs[-1]["bytes"],
                    "elasticpg_busbw_largest": rs[-1]["elasticpg"]["busbw_gbps"],
                    "gloo_busbw_largest": rs[-1]["gloo"]["busbw_gbps"]})
    return out


def summary_text(summary: list[dict[str, Any]]) -> str:
    rows = [[s["op"], str(s["sizes"]), f"{s['geomean_ratio']:.2f}", f"{s['ratio_smallest']:.2f}",
             f"{s['ratio_largest']:.2f}",
             "-" if s["op"] == "barrier" else human_bytes(s["bytes_largest"])] for s in summary]
    return ("# summary: ratio = elasticpg time / gloo time (lower is better; < 1 means "
            "elasticpg is faster)\n" + SUMMARY.text(rows))


def markdown_text(meta: dict[str, Any], rows: list[dict[str, Any]], ops: list[str],
                  summary: list[dict[str, Any]]) -> str:
    out = [f"**elasticpg vs gloo** (same run, same processes) - `{meta['command']}` - "
           f"{meta['ranks']} ranks, torch {meta['torch_version']}, float32, {meta['date']}, "
           f"{meta['platform']}, {meta['cpus']} CPUs, {meta['threads_per_rank']} intra-op "
           f"thread(s)/rank. time = mean per call of the best of {meta['rounds']} interleaved "
           f"rounds, max over ranks; ratio = elasticpg time / gloo time (lower is better); "
           f"speedup = gloo time / elasticpg time.", ""]
    for op in ops:
        rs = [r for r in rows if r["op"] == op]
        if not rs:
            continue
        cells = [[_size(r), num(r["elasticpg"]["time_us"], ".1f"),
                  num(r["elasticpg"]["busbw_gbps"], ".3f"), num(r["gloo"]["time_us"], ".1f"),
                  num(r["gloo"]["busbw_gbps"], ".3f"), f"{r['ratio']:.2f}",
                  f"{r['speedup']:.2f}"] for r in rs]
        out += [f"#### {op} (busbw factor {_factor_label(op)})", "", ROWS_MD.markdown(cells), ""]
    out += ["#### summary (ratio = elasticpg time / gloo time)", "", SUMMARY_MD.markdown(
        [[s["op"], f"{s['geomean_ratio']:.2f}", f"{s['ratio_smallest']:.2f}",
          f"{s['ratio_largest']:.2f}"] for s in summary])]
    return "\n".join(out) + "\n"


# ---- per-rank benchmark -----------------------------------------------------------------------

def _loopback_ifname() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for cand in ("lo", "lo0"):
        if cand in names:
            return cand
    return None


class _Runner:
    def __init__(self, rank: int, cfg: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank, self.cfg, self.n = rank, cfg, cfg["ranks"]
        self.all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.reduce_scatter = (getattr(dist, "reduce_scatter_single", None)
                               or dist.reduce_scatter_tensor)
        self.ctrl = None  # gloo default group: coordination only
        self.groups: dict[str, Any] = {}

    # -- setup / teardown
    def setup(self) -> None:
        from datetime import timedelta

        import elasticpg

        dist, cfg = self.dist, self.cfg
        timeout = timedelta(seconds=cfg["timeout"])
        store = dist.TCPStore(cfg.get("store_host", "127.0.0.1"), cfg["port"], self.n, False,
                              timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.n,
                                timeout=timeout)
        self.ctrl = dist.group.WORLD
        # Same creation order on every rank (new_group is collective). Under --netns each
        # rank listens on its own host's address ($ELASTICPG_HOST, set by the node pool).
        self.groups["elasticpg"] = dist.new_group(
            backend="elasticpg", timeout=timeout,
            pg_options=elasticpg.Options(host=None if cfg.get("netns") else "127.0.0.1"))
        self.groups["gloo"] = dist.new_group(backend="gloo", timeout=timeout)

    def teardown(self) -> None:
        dist = self.dist
        dist.barrier(group=self.ctrl)
        # Destroying WORLD shuts down every group of this process (gloo and elasticpg
        # subgroups included), so it is the one call that cleans up everything.
        dist.destroy_process_group()

    # -- collective helpers on the control group
    def allmax(self, v: float) -> float:
        t = self.torch.tensor([v], dtype=self.torch.float64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.ctrl)
        return float(t.item())

    def timed(self, fn: Callable[[], Any], iters: int) -> float:
        """Seconds for `iters` synchronous calls: the max over ranks."""
        self.dist.barrier(group=self.ctrl)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return self.allmax(time.perf_counter() - t0)

    # -- ops
    def inputs(self, op: str, count: int, nominal: int) -> dict[str, Any]:
        """Deterministic per-rank random inputs for one (op, size)."""
        torch, n = self.torch, self.n
        gen = torch.Generator().manual_seed(
            (self.cfg["seed"] * 1_000_003 + OPS.index(op) * 7919 + nominal) * 64 + self.rank)

        def rnd(k: int) -> Any:
            return torch.randn(k, generator=gen, dtype=torch.float32)

        if op == "all_gather":
            return {"inp": rnd(count // n)}
        if op in ("reduce_scatter", "all_to_all", "all_reduce"):
            return {"inp": rnd(count)}
        if op == "broadcast":
            return {"inp": rnd(count) if self.rank == 0 else torch.zeros(count)}
        return {}

    def call(self, op: str, group: Any, inp: dict[str, Any], fresh: bool) -> tuple[Any, Any]:
        """(zero-argument callable running `op` once on `group`, its output tensor).

        fresh=True: output buffers are new and in-place ops work on a copy of the input (for the
        correctness check). fresh=False: buffers for the timed loop; all_reduce then runs in
        place on zeros so that repeated SUMs cannot overflow, and inputs are shared.
        """
        torch, dist, n = self.torch, self.dist, self.n
        if op == "all_reduce":
            x = inp["inp"].clone() if fresh else torch.zeros_like(inp["inp"])
            return functools.partial(dist.all_reduce, x, group=group), x
        if op == "broadcast":
            x = inp["inp"].clone()
            return functools.partial(dist.broadcast, x, src=0, group=group), x
        if op == "all_gather":
            out = torch.empty(inp["inp"].numel() * n)
            return functools.partial(self.all_gather, out, inp["inp"], group=group), out
        if op == "reduce_scatter":
            out = torch.empty(inp["inp"].numel() // n)
            return functools.partial(self.reduce_scatter, out, inp["inp"], group=group), out
        if op == "all_to_all":
            out = torch.empty_like(inp["inp"])
            return functools.partial(dist.all_to_all_single, out, inp["inp"], group=group), out
        if op == "barrier":
            return functools.partial(dist.barrier, group=group), None
        raise ValueError(op)

    def verify(self, op: str, count: int, nbytes: int, inp: dict[str, Any]) -> None:
        """Run one iteration per backend on the same inputs; elasticpg must match gloo."""
        torch = self.torch
        outs = {}
        for b in BACKENDS:
            fn, out = self.call(op, self.groups[b], inp, fresh=True)
            fn()
            outs[b] = out
        if op == "barrier":
            return
        e, g = outs["elasticpg"], outs["gloo"]
        if e.shape != g.shape:
            bad, diff, detail = True, math.inf, f"shape {tuple(e.shape)} vs {tuple(g.shape)}"
        else:
            exact = op not in ("all_reduce", "reduce_scatter")
            if exact:
                ok = torch.equal(e, g)
            else:
                ok = torch.allclose(e, g, rtol=1e-5, atol=1e-5 * self.n)
            delta = (e.double() - g.double()).abs()
            diff = float(delta.max().item()) if delta.numel() else 0.0
            if math.isnan(diff):
                diff = math.inf
            bad, detail = not ok, ""
            if bad:
                mism = (e != g) if exact else ~torch.isclose(e, g, rtol=1e-5, atol=1e-5 * self.n)
                idx = mism.nonzero()
                i = int(idx[0].item()) if idx.numel() else 0
                detail = (f"{int(mism.sum().item())} of {e.numel()} elements differ; first at "
                          f"index {i}: elasticpg {e[i].item()!r} vs gloo {g[i].item()!r}")
        flags = torch.zeros(self.n, dtype=torch.float64)
        flags[self.rank] = 1.0 if bad else 0.0
        self.dist.all_reduce(flags, group=self.ctrl)
        worst = self.allmax(diff if bad else 0.0)
        if flags.sum().item() > 0:
            bad_ranks = [r for r in range(self.n) if flags[r].item() > 0]
            msg = (f"elasticpg {op} gave a WRONG RESULT at {human_bytes(nbytes)} ({count} float32 "
                   f"elements, {self.n} ranks): differs from gloo on rank(s) {bad_ranks}, "
                   f"max |elasticpg - gloo| = {worst:.6g}. Benchmark aborted.")
            if bad:
                msg += f" On rank {self.rank}: {detail}."
            raise ResultMismatchError(msg)

    def calibrate(self, fn: Callable[[], Any]) -> float:
        """Warm up one backend; returns its estimated seconds per call (agreed by all ranks)."""
        target, warmup = self.cfg["target_seconds"], self.cfg["warmup"]
        first = self.timed(fn, 1)  # not reported: absorbs one-off costs
        warm = _clamp(0.25 * target / max(first, 1e-9), 1, max(1, warmup))
        return self.timed(fn, warm) / warm  # the warm-up doubles as the calibration

    def measure(self, op: str, inp: dict[str, Any], turn: int) -> dict[str, dict[str, Any]]:
        """Time both backends on one (op, size) in interleaved rounds.

        Each backend gets about --target-seconds of timed calls, split into --rounds loops;
        rounds alternate between the backends (and the first backend alternates per size), so
        a burst of machine noise hits both alike. Reported time: the best round's mean per call
        (each round's time is the max over ranks); the overall mean and median are kept too.
        """
        cfg = self.cfg
        rounds = cfg["rounds"]
        fns = {b: self.call(op, self.groups[b], inp, fresh=False)[0] for b in BACKENDS}
        first = BACKENDS if turn % 2 == 0 else BACKENDS[::-1]
        per = {b: self.calibrate(fns[b]) for b in first}
        lo = -(-cfg["min_iters"] // rounds)
        hi = max(lo, cfg["max_iters"] // rounds)
        iters = {b: _clamp(round(cfg["target_seconds"] / rounds / max(per[b], 1e-9)), lo, hi)
                 for b in BACKENDS}
        times: dict[str, list[float]] = {b: [] for b in BACKENDS}
        for r in range(rounds):
            for b in (first if r % 2 == 0 else first[::-1]):
                times[b].append(self.timed(fns[b], iters[b]) / iters[b])
        out = {}
        for b in BACKENDS:
            ts = times[b]
            out[b] = {"time": min(ts), "mean": statistics.fmean(ts),
                      "median": statistics.median(ts),
                      "iters": iters[b] * rounds, "rounds": rounds}
        return out

    def run(self) -> None:
        cfg, n = self.cfg, self.n
        rows: list[dict[str, Any]] = []
        started = time.time()
        is0 = self.rank == 0
        if is0:
            print(cfg["banner"], flush=True)
        turn = 0
        for op in cfg["ops"]:
            if is0:
                print("\n" + table_header(op, n), flush=True)
            seen: set[int] = set()
            sizes = [0] if op == "barrier" else cfg["sizes"]
            for nominal in sizes:
                count, nbytes = geometry(op, nominal, n)
                if nbytes in seen:  # rounding for divisibility made it a duplicate
                    continue
                seen.add(nbytes)
                inp = self.inputs(op, count, nominal)
                self.verify(op, count, nbytes, inp)
                row = self.make_row(op, count, nbytes, self.measure(op, inp, turn))
                turn += 1
                rows.append(row)
                if is0:
                    print(table_row(row), flush=True)
                del inp
        if is0:
            self.report(rows, time.time() - started)

    def make_row(self, op: str, count: int, nbytes: int,
                 res: dict[str, dict[str, Any]]) -> dict[str, Any]:
        f = busbw_factor(op, self.n)
        row: dict[str, Any] = {"op": op, "bytes": nbytes, "count": count, "dtype": "float32",
                               "ranks": self.n, "busbw_factor": f, "verified": True}
        for b in BACKENDS:
            r = res[b]
            algbw = nbytes / r["time"] / _GB if op != "barrier" else None
            row[b] = {"time_us": r["time"] * 1e6, "algbw_gbps": algbw,
                      "busbw_gbps": None if algbw is None else algbw * f,
                      "mean_time_us": r["mean"] * 1e6, "median_time_us": r["median"] * 1e6,
                      "iters": r["iters"], "rounds": r["rounds"]}
        e, g = res["elasticpg"]["time"], res["gloo"]["time"]
        row["ratio"] = e / g
        row["speedup"] = g / e
        row["ratio_median"] = res["elasticpg"]["median"] / res["gloo"]["median"]
        return row

    def report(self, rows: list[dict[str, Any]], elapsed: float) -> None:
        cfg = self.cfg
        summary = summarize(rows, cfg["ops"])
        print("\n" + summary_text(summary), flush=True)
        print(f"# measured {len(rows)} (op, size) points x 2 backends in {elapsed:.1f} s "
              f"(all results verified against gloo)", flush=True)
        meta = dict(cfg["meta"])
        meta["benchmark_seconds"] = elapsed
        if cfg["json"]:
            with open(cfg["json"], "w", encoding="utf-8") as fh:
                json.dump({"meta": meta, "summary": summary, "rows": rows}, fh, indent=1)
                fh.write("\n")
            print(f"# wrote {cfg['json']}", flush=True)
        if cfg["markdown"]:
            with open(cfg["markdown"], "w", encoding="utf-8") as fh:
                fh.write(markdown_text(meta, rows, cfg["ops"], summary))
            print(f"# wrote {cfg['markdown']}", flush=True)


def _worker(rank: int, cfg: dict[str, Any]) -> None:
    if "GLOO_SOCKET_IFNAME" not in os.environ and cfg["gloo_ifname"]:
        os.environ["GLOO_SOCKET_IFNAME"] = cfg["gloo_ifname"]
    import torch

    torch.set_num_threads(cfg["threads"])
    runner = _Runner(rank, cfg)
    runner.setup()
    runner.run()
    runner.teardown()


def _netns_job(rank: int, world: int, port: int, cfg: dict[str, Any]) -> None:
    """One rank of a --netns run, on a node of its own host (elasticpg.netns)."""
    _worker(rank, {**cfg, "port": port})


def _run_over_netns(cfg: dict[str, Any], ranks: int, timeout: float) -> int:
    """Every rank in a network namespace of its own ("hosts" joined by veth links to a
    bridge): both backends cross real links. Needs root and `ip` (elasticpg.netns)."""
    from elasticpg.netns.nodes import run_once
    from elasticpg.netns.topology import SWITCH_ADDR, Topology, unavailable

    why = unavailable()
    if why:
        print(f"elasticpg-bench: --netns: {why}", file=sys.stderr)
        return 2
    topo = Topology(f"epgbench-{os.getpid()}", hosts=ranks)
    from elasticpg.cli import bench as this  # picklable by name, also under `python -m`

    res = run_once(topo, range(ranks), this._netns_job,
                   {**cfg, "netns": True, "store_host": SWITCH_ADDR, "gloo_ifname": "eth0"},
                   timeout=timeout, prog="elasticpg-bench")
    if res is None:
        return 1
    return 0


# ---- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elasticpg-bench",
        description="Benchmark elasticpg against gloo side by side in one run (nccl-tests "
                    "conventions: latency, algbw, busbw; ratio = elasticpg time / gloo time).")
    p.add_argument("--ranks", "-n", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--ops", type=comma_choices(OPS, "op", _ALIASES, allow_all=True),
                   default=list(OPS),
                   help=f"comma-separated ops or 'all' (default): {', '.join(OPS)}")
    p.add_argument("--min-bytes", "-b", type=int, default=4, help="smallest size (default 4)")
    p.add_argument("--max-bytes", "-e", type=int, default=64 << 20,
                   help="largest size (default 67108864 = 64 MiB)")
    p.add_argument("--factor", "-f", type=int, default=4,
                   help="size multiplication factor (default 4)")
    p.add_argument("--target-seconds", type=float, default=0.2,
                   help="aim for this much timed time per (op, size, backend) (default 0.2)")
    p.add_argument("--min-iters", type=int, default=3,
                   help="timed iterations at least, all rounds together (default 3)")
    p.add_argument("--max-iters", type=int, default=1000,
                   help="timed iterations at most, all rounds together (default 1000)")
    p.add_argument("--warmup", type=int, default=5,
                   help="warm-up iterations at most, after one untimed call; fewer when a call "
                        "is slow (default 5)")
    p.add_argument("--rounds", type=int, default=4,
                   help="split each backend's timed calls into this many loops, interleaved "
                        "with the other backend's; report the best loop (default 4; 1 = one "
                        "plain loop)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads per rank (default: CPU cores / ranks, >= 1)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="per-operation timeout in seconds for both backends (default 300)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random inputs")
    p.add_argument("--netns", action="store_true",
                   help="one rank per network namespace, joined by veth links (multi-host "
                        "over real links, on this machine; needs root and iproute2)")
    p.add_argument("--json", metavar="PATH", help="write all rows (and metadata) as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write markdown tables for a README")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.ranks < 2:
        p.error("--ranks must be at least 2")
    if a.min_bytes < 1 or a.max_bytes < a.min_bytes:
        p.error("need 1 <= --min-bytes <= --max-bytes")
    if a.factor < 2:
        p.error("--factor must be at least 2")
    if a.target_seconds <= 0 or a.timeout <= 0:
        p.error("--target-seconds and --timeout must be positive")
    if a.min_iters < 1 or a.max_iters < a.min_iters:
        p.error("need 1 <= --min-iters <= --max-iters")
    if a.warmup < 0 or a.rounds < 1 or a.threads < 0:
        p.error("--warmup and --threads must be >= 0, --rounds >= 1")
    check_output_dirs(p, a.json, a.markdown)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    import torch
    import torch.multiprocessing as mp

    # Spawned children must find _worker in an importable module, also under `python -m`.
    from elasticpg.cli import bench as this

    cpus = cpu_count()
    threads = args.threads or max(1, cpus // args.ranks)
    sizes = size_list(args.min_bytes, args.max_bytes, args.factor)
    meta = {
        "command": command_line("elasticpg-bench", "elasticpg.cli.bench", argv),
        "ranks": args.ranks, **host_meta(cpus), "threads_per_rank": threads, "dtype": "float32",
        "target_seconds": args.target_seconds,
        "min_iters": args.min_iters, "max_iters": args.max_iters, "warmup": args.warmup,
        "rounds": args.rounds, "ops": args.ops, "sizes": sizes,
    }
    oversub = oversubscription_note(args.ranks, cpus)
    banner = (f"# elasticpg-bench: {meta['command']}\n"
              f"# {args.ranks} ranks, torch {torch.__version__}, float32, {meta['date']}, "
              f"{meta['platform']}, {cpus} CPUs, {threads} intra-op thread(s)/rank{oversub}\n"
              f"# sizes {human_bytes(sizes[0])} .. {human_bytes(sizes[-1])} (x{args.factor}); "
              f"~{args.target_seconds:g} s of timed calls per backend and point, "
              f"{args.min_iters}..{args.max_iters} iters in {args.rounds} interleaved round(s), "
              f"best round reported; gloo and elasticpg in the same processes; times are max "
              f"over ranks\n"
              f"# ratio = elasticpg time / gloo time (lower is better), speedup = gloo / "
              f"elasticpg; every point is checked: elasticpg's result must equal gloo's")

    cfg = {
        "ranks": args.ranks, "ops": args.ops, "sizes": sizes,
        "target_seconds": args.target_seconds, "min_iters": args.min_iters,
        "max_iters": args.max_iters, "warmup": args.warmup, "rounds": args.rounds,
        "threads": threads, "timeout": args.timeout, "seed": args.seed, "json": args.json,
        "markdown": args.markdown, "meta": meta, "banner": banner,
        "gloo_ifname": _loopback_ifname(),
    }
    t0 = time.perf_counter()
    if args.netns:
        rc = _run_over_netns(cfg, args.ranks, timeout=args.timeout * 20)
        print(f"# total wall time {time.perf_counter() - t0:.1f} s (including process "
              f"start-up)", flush=True)
        return rc
    store, port = listen_store(args.ranks, args.timeout)
    cfg["port"] = port
    ctx = mp.start_processes(this._worker, args=(cfg,), nprocs=args.ranks, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=0.5):
            pass
    except mp.ProcessRaisedException as exc:
        last = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        print(f"elasticpg-bench: rank {exc.error_index} (pid {exc.error_pid}) failed:\n{exc}",
              file=sys.stderr, flush=True)
        if last:
            print(f"elasticpg-bench: FAILED: {last[-1].strip()}", file=sys.stderr, flush=True)
        return 1
    except mp.ProcessExitedException as exc:
        print(f"elasticpg-bench: FAILED: rank {exc.error_index} (pid {exc.error_pid}) exited "
              f"without finishing: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in ctx.processes:
            proc.join(5)
        print("elasticpg-bench: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        del store
    print(f"# total wall time {time.perf_counter() - t0:.1f} s (including process start-up)",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
