"""elasticpg ep-bench: expert-parallel dispatch/combine (elasticpg.ep.Buffer) side by side with
gloo baselines, in one run, on the same processes and the same inputs.

    elasticpg ep-bench [--ranks 2,4] [--shapes 128x2048x32x8,64x1024x16x4,32x256x8x4]
                       [--modes bf16,fp8] [--steps 40] [--json PATH] [--markdown PATH]

A shape is tokens-per-rank x hidden x experts x top-k. Two baselines:

* "gloo" (the issue's "straightforward baseline built on gloo"; the speedup and the targets
  are against it): the same dispatch/combine semantics written the plain way with torch ops
  and gloo's all_to_all_single (counts, then rows; combine sends the answers back with the
  known counts); see elasticpg/cli/epbaseline.py.
* "Buffer/gloo": our own Buffer (its routing, layout, reused buffers and C fold) with only its
  byte exchange swapped for gloo all_to_all_single (sizes, then the concatenated blocks):
  what our math costs over gloo's transport, to show how much of the gain is the exchange.

Before timing, all three give identical results on one step (recv_count, every valid row
of recv_x and its fp8 scales, and the combined output: bit for bit), else the run fails.

Each step is preceded by an (untimed) barrier so ranks start it together; a step's time is the
slowest rank's. Backends alternate in rounds so machine noise hits all alike. Reported per
(ranks, shape, mode): dispatch, combine and dispatch+combine latency, median and p99 over the
steps, and bandwidth by DeepEP's formulas: bytes per selection (non-masked top-k entry) are
hidden + hidden/128*4 + 16 for an fp8 dispatch, 2*hidden for a bf16 dispatch and for combine;
GB/s = a rank's bytes / the median time. The issue's figures for the reference's own CPU
fallback (over gloo, same machine class) are printed beside the shapes they were measured at.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import timedelta
from typing import Any

from elasticpg.cli.launching import HOST, check_output_dirs, command_line, cpu_count, host_meta
from elasticpg.cli.rank_pool import RankPool
from elasticpg.cli.tables import Column, Table, num

# (ranks, tokens, hidden, experts, topk) -> the reference fallback's dispatch+combine in ms,
# the lower ends of the measured ranges (dispatch 33-36 + combine 37-44; 7-12 + 14-15)
REFERENCE_FALLBACK_MS = {(4, 64, 1024, 16, 4): 33.0 + 37.0, (2, 32, 256, 8, 4): 7.0 + 14.0}
TARGETS = {2: 5.0, 4: 3.0}  # dispatch+combine speedup over the gloo baseline
BACKENDS = ("elasticpg", "gloo", "buffer_gloo")


class GlooExchange:
    """The "Buffer/gloo" transport: gloo's all_to_all_single of the per-destination sizes, then of
    the concatenated bytes with those split sizes (what a straightforward gloo version of the
    exchange does); the receives are views of one output buffer."""

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group, self.rank, self.size, self.timeout = group, rank, size, 60.0

    def participants(self) -> tuple[int, ...]:
        return tuple(range(self.size))

    def alltoall(self, round_code: int, parts: tuple[int, ...], sends: list, alloc: Any,
                 bound: float) -> tuple[dict, set[int]]:
        import torch
        import torch.distributed as dist

        sizes = torch.tensor([s.numel() for s in sends], dtype=torch.int64)
        rsizes = torch.empty_like(sizes)
        dist.all_to_all_single(rsizes, sizes, group=self.group)
        inp = torch.cat(sends)
        out = torch.empty(int(rsizes.sum()), dtype=torch.uint8)
        dist.all_to_all_single(out, inp, rsizes.tolist(), sizes.tolist(), group=self.group)
        got, at = {}, 0
        for p, n in zip(parts, rsizes.tolist(), strict=True):
            got[p] = out[at:at + n]
            at += n
        return got, set()

    def alltoall_direct(self, round_code: int, parts: tuple[int, ...], sizes: list[int],
                        write: Any, bound: float) -> tuple[dict, set[int]]:
        import numpy as np
        import torch

        from elasticpg.collectives.shm_algorithms import Peek

        sizes = [0 if p == self.rank else n for p, n in zip(parts, sizes, strict=True)]
        offsets = list(np.cumsum([0] + sizes[:-1]))
        stream = torch.empty(sum(sizes), dtype=torch.uint8)
        write(stream.numpy(), [o if n else -1 for o, n in zip(offsets, sizes, strict=True)])
        got, failed = self.alltoall(round_code, parts,
                                    [stream[o:o + n] for o, n in zip(offsets, sizes,
                                                                     strict=True)],
                                    None, bound)
        return {p: Peek(t.numpy()) for p, t in got.items() if p != self.rank}, failed


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        t, h, e, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected TOKENSxHIDDENxEXPERTSxTOPK"
                                         ) from None
    if min(t, h, e, k) <= 0 or k > e:
        raise argparse.ArgumentTypeError(f"shape {text!r}: positive values, topk <= experts")
    return t, h, e, k


def selection_bytes(hidden: int, fp8: bool) -> tuple[int, int]:
    """DeepEP's bytes per selection: (dispatch, combine)."""
    return (hidden + hidden // 128 * 4 + 16 if fp8 else 2 * hidden), 2 * hidden


def _inputs(rank: int, step: int, tokens: int, hidden: int, experts: int, k: int):
    import torch

    g = torch.Generator().manual_seed(7919 * step + rank)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    idx = torch.rand(tokens, experts, generator=g).topk(k, dim=1).indices
    idx[torch.rand(tokens, k, generator=g) < 0.05] = -1  # a few masked selections
    w = torch.rand(tokens, k, generator=g)
    return x, idx, w


def _step(buf: Any, x, idx, w, active, n: int, experts: int, fp8: bool, y) -> tuple:
    """One dispatch + combine: (dispatch s, combine s, combined, (recv_x, recv_count))."""
    import time

    from elasticpg.cli.epbaseline import GlooDispatchCombine

    if isinstance(buf, GlooDispatchCombine):
        t0 = time.perf_counter()
        recv, count, handle = buf.dispatch(x, idx, n, experts, fp8)
        t1 = time.perf_counter()
        out = buf.combine(y if y is not None else _expert_out(recv, fp8), w, handle, x.dtype)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out, (recv, count)
    t0 = time.perf_counter()
    recv, count, handle, _ev, _hook = buf.dispatch(x, idx, active, n, experts, -1, use_fp8=fp8)
    t1 = time.perf_counter()
    out, _ev, _hook = buf.combine(y if y is not None else _expert_out(recv, fp8), idx, w,
                                  active, -1, handle)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out, (recv, count)


def _same(a: tuple, b: tuple) -> bool:
    """Identical results: combined output, recv_count, and every valid row of recv_x (and of
    its fp8 scales); rows past recv_count carry no meaning."""
    import torch

    (out_a, (recv_a, count_a)), (out_b, (recv_b, count_b)) = a, b
    if not torch.equal(out_a, out_b) or not torch.equal(count_a, count_b):
        return False
    parts_a = recv_a if isinstance(recv_a, tuple) else (recv_a,)
    parts_b = recv_b if isinstance(recv_b, tuple) else (recv_b,)
    for pa, pb in zip(parts_a, parts_b, strict=True):
        for e, c in enumerate(count_a.tolist()):
            va, vb = pa[e, :c], pb[e, :c]
            if va.dtype == torch.float8_e4m3fn:
                va, vb = va.view(torch.uint8), vb.view(torch.uint8)
            if not torch.equal(va, vb):
                return False
    return True


def _expert_out(recv: Any, fp8: bool) -> Any:
    import torch

    from elasticpg.ep.layout import dequantize_fp8

    vals = dequantize_fp8(*recv) if fp8 else recv.float()
    return (vals * 1.5).to(torch.bfloat16)


def _job(rank: int, world: int, port: int, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from elasticpg.cli.epbaseline import GlooDispatchCombine
    from elasticpg.ep import Buffer

    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    ep_group = dist.new_group(backend="elasticpg")
    bufs = {"elasticpg": Buffer(ep_group),
            "gloo": GlooDispatchCombine(dist.group.WORLD, world),
            "buffer_gloo": Buffer(None, exchange=GlooExchange(dist.group.WORLD, rank, world))}
    results = []
    for tokens, hidden, experts, k in cfg["shapes"]:
        if experts % world:
            continue
        for mode in cfg["modes"]:
            fp8 = mode == "fp8"
            active = torch.ones(world, dtype=torch.int32)
            x, idx, w = _inputs(rank, 0, tokens, hidden, experts, k)
            outs = {b: _step(bufs[b], x, idx, w, active, tokens, experts, fp8, None)[2:]
                    for b in BACKENDS}
            same = all(_same(outs["elasticpg"], outs[b]) for b in BACKENDS[1:])
            local = experts // world
            y = torch.randn(local, world * tokens, hidden).to(torch.bfloat16)
            times: dict[str, list[tuple[float, float]]] = {b: [] for b in BACKENDS}
            steps = cfg["steps"]
            rounds = 4
            for rnd in range(rounds):
                order = BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]
                for b in order:
                    for s in range(2 + steps // rounds):  # the first two: warm-up
                        x, idx, w = _inputs(rank, 1 + s, tokens, hidden, experts, k)
                        dist.barrier(group=ep_group)
                        td, tc, *_ = _step(bufs[b], x, idx, w, active, tokens, experts, fp8,
                                           y)
                        if s >= 2:
                            times[b].append((td, tc))
            sel = int((idx >= 0).sum())
            results.append({"shape": (tokens, hidden, experts, k), "mode": mode,
                            "same": same, "times": times, "selections": sel,
                            "active": active.tolist()})
    dist.destroy_process_group()
    return {"results": results}


def _stats(per_rank: list[list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """Per step, the slowest rank; then median and p99 over steps (ms)."""
    steps = list(zip(*per_rank, strict=True))
    out = {}
    for name, f in (("dispatch", lambda s: s[0]), ("combine", lambda s: s[1]),
                    ("both", lambda s: s[0] + s[1])):
        vals = sorted(max(f(r) for r in step) * 1e3 for step in steps)
        p99 = vals[min(len(vals) - 1, int(round(0.99 * (len(vals) - 1))))]
        out[name] = {"median": statistics.median(vals), "p99": p99}
    return out


def analyse(world: int, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for i, res in enumerate(per_rank[0]["results"]):
        tokens, hidden, experts, k = res["shape"]
        fp8 = res["mode"] == "fp8"
        rank_res = [p["results"][i] for p in per_rank]
        if not all(r["same"] for r in rank_res):
            raise RuntimeError(f"elasticpg and a gloo baseline disagree at {res['shape']} "
                               f"{res['mode']}: a benchmark of wrong results is worthless")
        st = {b: _stats([r["times"][b] for r in rank_res]) for b in BACKENDS}
        sel = statistics.mean(r["selections"] for r in rank_res)
        db, cb = selection_bytes(hidden, fp8)
        for op in ("dispatch", "combine", "both"):
            nbytes = sel * {"dispatch": db, "combine": cb, "both": db + cb}[op]
            e, g, bg = st["elasticpg"][op], st["gloo"][op], st["buffer_gloo"][op]
            ref = REFERENCE_FALLBACK_MS.get((world, tokens, hidden, experts, k)) \
                if op == "both" and not fp8 else None
            rows.append({"ranks": world, "tokens": tokens, "hidden": hidden, "experts": experts,
                         "topk": k, "mode": res["mode"], "op": op,
                         "ep_median_ms": e["median"], "ep_p99_ms": e["p99"],
                         "ep_gbps": nbytes / (e["median"] * 1e-3) / 1e9,
                         "gloo_median_ms": g["median"], "gloo_p99_ms": g["p99"],
                         "gloo_gbps": nbytes / (g["median"] * 1e-3) / 1e9,
                         "speedup": g["median"] / e["median"],
                         "buffer_gloo_median_ms": bg["median"],
                         "buffer_gloo_speedup": bg["median"] / e["median"],
                         "vs_reference": ref / e["median"] if ref else None})
    return rows


TABLE = Table(Column("ranks"), Column("tokens x hidden x experts, top-k", left=True),
              Column("dtype", left=True), Column("op", left=True), Column("ep median ms"),
              Column("ep p99 ms"), Column("ep GB/s"), Column("gloo median ms"),
              Column("gloo p99 ms"), Column("gloo GB/s"), Column("speedup"),
              Column("Buffer/gloo median ms"), Column("vs Buffer/gloo"),
              Column("vs ref. fallback"))


def cells(r: dict[str, Any]) -> list[str]:
    return [str(r["ranks"]), f"{r['tokens']} x {r['hidden']} x {r['experts']}, {r['topk']}",
            r["mode"], {"both": "dispatch+combine"}.get(r["op"], r["op"]),
            num(r["ep_median_ms"], ".3f"), num(r["ep_p99_ms"], ".3f"), num(r["ep_gbps"], ".2f"),
            num(r["gloo_median_ms"], ".3f"), num(r["gloo_p99_ms"], ".3f"),
            num(r["gloo_gbps"], ".2f"), num(r["speedup"], ".1f") + "x",
            num(r["buffer_gloo_median_ms"], ".3f"), num(r["buffer_gloo_speedup"], ".1f") + "x",
            num(r["vs_reference"], ".0f") + ("x" if r["vs_reference"] else "")]


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for world, target in TARGETS.items():
        both = [r for r in rows if r["ranks"] == world and r["op"] == "both"]
        if both:
            worst = min(r["speedup"] for r in both)
            lines.append(f"{world} ranks: dispatch+combine speedup over gloo >= {worst:.1f}x "
                         f"at every shape (target {target:.0f}x: "
                         f"{'met' if worst >= target else 'NOT met'}); over Buffer/gloo "
                         f">= {min(r['buffer_gloo_speedup'] for r in both):.1f}x")
    refs = [r for r in rows if r["vs_reference"]]
    for r in refs:
        lines.append(f"{r['ranks']} ranks {r['tokens']}x{r['hidden']}x{r['experts']} top-"
                     f"{r['topk']}: {r['vs_reference']:.0f}x faster than the reference "
                     f"fallback's figures (target 20x: "
                     f"{'met' if r['vs_reference'] >= 20 else 'NOT met'})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elasticpg ep-bench", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="2,4", help="comma-separated rank counts (default 2,4)")
    p.add_argument("--shapes", default="128x2048x32x8,64x1024x16x4,32x256x8x4",
                   help="comma-separated TOKENSxHIDDENxEXPERTSxTOPK")
    p.add_argument("--modes", default="bf16,fp8", help="bf16, fp8 or both (default both)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per backend (default 40)")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--markdown", help="write the table as Markdown here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        ranks = [int(v) for v in a.ranks.split(",")]
        shapes = [parse_shape(s) for s in a.shapes.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    modes = a.modes.split(",")
    if not set(modes) <= {"bf16", "fp8"} or min(ranks) < 1 or a.steps < 4:
        p.error("--modes takes bf16,fp8; --ranks positive; --steps at least 4")
    check_output_dirs(p, a.json, a.markdown)
    cfg = {"shapes": shapes, "modes": modes, "steps": a.steps}
    pool = RankPool(max(ranks))
    rows: list[dict[str, Any]] = []
    try:
        for world in ranks:
            per_rank = pool.run(_job, cfg, world=world, timeout=600)
            rows += analyse(world, per_rank)
    finally:
        pool.close()
    cmd = command_line("elasticpg ep-bench", "elasticpg.cli.epbench", argv)
    text = [cells(r) for r in rows]
    print(f"# {cmd}\n# {host_meta(cpu_count())}")
    print(TABLE.text(text))
    for line in verdict(rows):
        print(line)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(TABLE.markdown(text) + "\n\n" + "\n".join(verdict(rows)) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": cmd, "meta": host_meta(cpu_count()), "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
