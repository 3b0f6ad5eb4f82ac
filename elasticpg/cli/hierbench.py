"""elasticpg hier-bench: collectives across hosts with several ranks per host, three ways side
by side in one run: elasticpg hierarchical (shared memory inside a host, TCP between the host
leaders), elasticpg flat (TCP between every pair, as before), and gloo.

    elasticpg hier-bench [--hosts 2] [--ranks-per-host 2] [--ops all_reduce,broadcast,all_gather]
                         [--min-bytes 4] [--max-bytes 67108864] [--factor 16]
                         [--target-seconds 0.3]

Every host is a network namespace (elasticpg.netns: root and `ip` needed), its ranks are
processes inside it; gloo runs over each namespace's eth0. The three are groups of the same
processes: two elasticpg groups (the second with hierarchical collectives switched off on every
rank before its first collective, so the choice stays alike everywhere) and a gloo group. For
every op and size one call of each runs on the same random inputs and the results are compared
(all_reduce: allclose, the orders of summation differ; broadcast from rank 0 and
all_gather_into_tensor: equal); then each is timed in --rounds loops that alternate between
the three, a loop's time being the max over ranks; the best loop's mean per call is reported.
float32; all_reduce SUM in place on zeros while timed; sizes are per rank (all_gather's
output is ranks x size). The hierarchical group runs hierarchically at every size; the "rule"
column says which form the default size rule (core.hierarchy.pays) picks.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

from elasticpg.cli.bench import human_bytes, size_list
from elasticpg.core.framing import OpKind
from elasticpg.core.hierarchy import pays

VARIANTS = ("hierarchical", "flat", "gloo")
OPS = ("all_reduce", "broadcast", "all_gather")
KINDS = {"all_reduce": OpKind.ALLREDUCE, "broadcast": OpKind.BROADCAST,
         "all_gather": OpKind.ALLGATHER_INTO_TENSOR}


def _job(rank: int, world: int, port: int, cfg: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One rank: set up the three groups, verify and time every size; rank 0 returns rows."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import elasticpg
    from elasticpg.api import runtime_of
    from elasticpg.netns.topology import SWITCH_ADDR

    torch.set_num_threads(1)
    timeout = timedelta(seconds=cfg["timeout"])
    store = dist.TCPStore(SWITCH_ADDR, port, world, False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    ctrl = dist.group.WORLD
    groups = {"hierarchical": dist.new_group(backend="elasticpg", timeout=timeout,
                                             pg_options=elasticpg.Options(host=None)),
              "flat": dist.new_group(backend="elasticpg", timeout=timeout,
                                     pg_options=elasticpg.Options(host=None)),
              "gloo": dist.new_group(backend="gloo", timeout=timeout)}
    runtime_of(groups["flat"]).hierarchical = False
    hier_rt = runtime_of(groups["hierarchical"])
    hier_rt.hier_every_size = True  # measured at every size; the rule is reported beside
    if hier_rt.hier_plan(hier_rt.view.active) is None:
        raise RuntimeError("the hierarchical group has no hierarchical plan: check placement")

    def allmax(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctrl)
        return float(t.item())

    def timed(fn: Any, iters: int) -> float:
        dist.barrier(group=ctrl)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return allmax(time.perf_counter() - t0) / iters

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def call(op: str, x: torch.Tensor, out: torch.Tensor | None, g: Any) -> None:
        if op == "all_reduce":
            dist.all_reduce(x, group=g)
        elif op == "broadcast":
            dist.broadcast(x, src=0, group=g)
        else:
            gather(out, x, group=g)

    rows = []
    for k, (op, nbytes) in enumerate((o, n) for o in cfg["ops"] for n in cfg["sizes"]):
        count = max(1, nbytes // 4)
        gen = torch.Generator().manual_seed(cfg["seed"] * 7919 + nbytes * 64 + rank)
        x = torch.randn(count, generator=gen)
        outs = {}
        for v in VARIANTS:
            y = x.clone()
            out = torch.zeros(world * count) if op == "all_gather" else None
            call(op, y, out, groups[v])
            outs[v] = y if out is None else out
        if op == "all_reduce":
            ok = all(torch.allclose(outs["hierarchical"], outs[v], rtol=1e-5, atol=1e-5 * world)
                     for v in ("flat", "gloo"))
        else:
            ok = all(torch.equal(outs["hierarchical"], outs[v]) for v in ("flat", "gloo"))
        if allmax(0.0 if ok else 1.0) > 0:
            raise RuntimeError(f"{op} results differ at {human_bytes(nbytes)} on some rank")
        gather_out = torch.zeros(world * count) if op == "all_gather" else None
        fns = {v: functools.partial(call, op, torch.zeros(count), gather_out, groups[v])
               for v in VARIANTS}
        per = {v: max(timed(fns[v], 2), 1e-6) for v in VARIANTS}  # warm-up and estimate
        iters = {v: max(1, min(cfg["max_iters"], round(cfg["target_seconds"] / cfg["rounds"]
                                                       / per[v]))) for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        order = list(VARIANTS[k % 3:] + VARIANTS[:k % 3])
        for r in range(cfg["rounds"]):
            for v in (order if r % 2 == 0 else order[::-1]):
                times[v].append(timed(fns[v], iters[v]))
        row = {"op": op, "bytes": nbytes, **{f"{v}_us": min(times[v]) * 1e6 for v in VARIANTS}}
        row["hier_vs_gloo"] = row["hierarchical_us"] / row["gloo_us"]
        row["hier_vs_flat"] = row["hierarchical_us"] / row["flat_us"]
        row["flat_vs_gloo"] = row["flat_us"] / row["gloo_us"]
        row["rule"] = "hier" if pays(KINDS[op], count * 4) else "flat"
        rows.append(row)
        if rank == 0:
            print(_line(row), flush=True)
    dist.barrier(group=ctrl)
    dist.destroy_process_group()
    return rows if rank == 0 else None


HEADER = (f"{'op':>10} {'size':>10} {'hier us':>10} {'flat us':>10} {'gloo us':>10} "
          f"{'hier/gloo':>9} {'hier/flat':>9} {'flat/gloo':>9} {'rule':>5}")


def _line(row: dict[str, Any]) -> str:
    return (f"{row['op']:>10} {human_bytes(row['bytes']):>10} {row['hierarchical_us']:>10.1f} "
            f"{row['flat_us']:>10.1f} {row['gloo_us']:>10.1f} {row['hier_vs_gloo']:>9.2f} "
            f"{row['hier_vs_flat']:>9.2f} {row['flat_vs_gloo']:>9.2f} {row['rule']:>5}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elasticpg hier-bench", description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=2, help="network namespaces (default 2)")
    p.add_argument("--ranks-per-host", type=int, default=2, help="ranks in each (default 2)")
    p.add_argument("--ops", default=",".join(OPS),
                   help=f"comma-separated, of {', '.join(OPS)} (default all)")
    p.add_argument("--min-bytes", type=int, default=4)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--factor", type=int, default=16)
    p.add_argument("--target-seconds", type=float, default=0.3,
                   help="timed seconds per variant and size (default 0.3)")
    p.add_argument("--rounds", type=int, default=4, help="alternating loops per variant")
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=120.0, help="per collective, seconds")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hosts < 2 or args.ranks_per_host < 1 or args.factor < 2 or args.min_bytes < 4:
        print("elasticpg hier-bench: need --hosts >= 2, --ranks-per-host >= 1, --factor >= 2, "
              "--min-bytes >= 4", file=sys.stderr)
        return 2
    from elasticpg.netns.nodes import run_once
    from elasticpg.netns.topology import Topology, unavailable

    why = unavailable()
    if why:
        print(f"elasticpg hier-bench: {why}", file=sys.stderr)
        return 2
    ops = [o for o in args.ops.split(",") if o]
    if not ops or any(o not in OPS for o in ops):
        print(f"elasticpg hier-bench: --ops takes {', '.join(OPS)}", file=sys.stderr)
        return 2
    cfg = {"ops": ops, "sizes": size_list(args.min_bytes, args.max_bytes, args.factor),
           "target_seconds": args.target_seconds, "rounds": args.rounds,
           "max_iters": args.max_iters, "seed": args.seed, "timeout": args.timeout}
    placement = [h for h in range(args.hosts) for _ in range(args.ranks_per_host)]
    topo = Topology(f"epghier-{os.getpid()}", hosts=args.hosts)
    print(f"# {', '.join(ops)}, float32, {args.hosts} hosts (network namespaces) x "
          f"{args.ranks_per_host} ranks, {os.cpu_count()} cores; ratio < 1: first is faster\n"
          + HEADER, flush=True)
    from elasticpg.cli import hierbench as this  # picklable by name, also under -m

    res = run_once(topo, placement, this._job, cfg, prog="elasticpg hier-bench",
                   timeout=600 + 20 * len(ops) * len(cfg["sizes"]) * args.target_seconds * 3)
    if res is None:
        return 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"hosts": args.hosts, "ranks_per_host": args.ranks_per_host,
                       "rows": res[0]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
