"""elasticpg scale-sim: what one membership change costs at 64..1024 ranks, without a data plane.

    elasticpg scale-sim [--ranks 64,128,256,512,1024] [--clients 4] [--timeout 60]
                        [--json PATH] [--markdown PATH]

For each size N, N ranks run in this process as real `GroupRuntime`s (group/runtime.py, so the
real core/group_state.py, group/views.py and control/group_store.py), each over a real
TCPStore on 127.0.0.1 (one server; the ranks share --clients client connections, each size
under its own key prefix). Only the data plane is replaced (`_open_data_plane`): frames a rank
sends (VIEW, JOIN, the HELLO of a new link) are handed to the receiving runtime's own frame and
link callbacks in-process, and counted; there is no shared memory and no liveness thread.

The scenario, per size: all N slots active; slot N/2's process dies (every survivor's reader
sees its link close: `_on_lost`), and each survivor reaches its next operation boundary
(`prepare`: mode (a) decides and applies the exclusion); then a replacement process for that
slot calls join_group, the members link back, agree on its readiness (the digests that ride on
a collective's frames, handed over here), and call recover_ranks (`activate`; the MEMBERSHIP
exchange, data plane, is the one step taken as given: every member asks for the same slot).

Ranks take their turns one after another, so "wall" is the sum of every rank's part, an upper
bound of the real (parallel) time; "per rank" is that over the ranks that took part; "cpu" is
this process's CPU time (every rank and the store server), which a loaded machine inflates
less than wall time. Store
operations are requests to the server (a wait and the get behind it count as two); messages
are frames between ranks. The ratio columns compare a row with the row before it.
Exit status 1 if the ranks did not end with one agreed view, or if store operations or messages
grow faster than linearly (see `superlinear`).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from elasticpg.cli.launching import HOST, check_output_dirs, listen_store
from elasticpg.cli.tables import Column, Table, num
from elasticpg.core.framing import Header
from elasticpg.core.group_state import Call
from elasticpg.core.membership import View
from elasticpg.core.slot_masks import MAX_SLOTS
from elasticpg.group.runtime import GroupRuntime
from elasticpg.options import Options

SIZES = (64, 128, 256, 512, 1024)
SLOPE_LIMIT = 1.1  # see superlinear
TARGET_RANKS, TARGET_S = 1024, 1.0  # issue 15: failure -> one agreed view


class CountingStore:
    """A c10d store client that counts the requests made through it (all ranks' together)."""

    def __init__(self, store: dist.Store, counts: Counter, lock: threading.Lock) -> None:
        self._store, self._counts, self._lock = store, counts, lock

    def _count(self, op: str, n: int = 1) -> None:
        with self._lock:
            self._counts[op] += n

    def set(self, key: str, value: str | bytes) -> None:
        self._count("set")
        self._store.set(key, value)

    def get(self, key: str) -> bytes:
        self._count("get")
        return self._store.get(key)

    def add(self, key: str, amount: int) -> int:
        self._count("add")
        return self._store.add(key, amount)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        self._count("compare_set")
        return self._store.compare_set(key, expected, desired)

    def check(self, keys: list[str]) -> bool:
        self._count("check")
        return self._store.check(keys)

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self._count("wait")
        self._store.wait(keys, timeout)


class SimNet:
    """The processes alive in each slot, and the frames between them (counted)."""

    def __init__(self) -> None:
        self.live: dict[int, SimRank] = {}
        self.lock = threading.Lock()
        self.messages: Counter = Counter()
        self.ready = threading.Condition()
        self.ready_count = 0

    def count(self, kind: str) -> None:
        with self.lock:
            self.messages[kind] += 1

    def target(self, peer: int, incarnation: int | None = None) -> SimRank:
        r = self.live.get(peer)
        if r is None or (incarnation is not None and r.incarnation != incarnation):
            raise ConnectionRefusedError(f"no process of slot {peer} at that endpoint")
        return r


class SimLinks:
    """What GroupRuntime uses of TcpTransport: outgoing links that deliver in-process."""

    def __init__(self, net: SimNet, rt: SimRank) -> None:
        self.net, self.rt = net, rt
        self.out: set[int] = set()
        self.endpoint = (HOST, 1 + rt.rank)  # published, never listened on

    def connect(self, peer: int, host: str, port: int, timeout: float,
                incarnation: int | None = None) -> None:
        target = self.net.target(peer, incarnation)
        self.net.count("hello")
        self.out.add(peer)
        target._on_connected(self.rt.rank, self.rt.incarnation)

    def connected(self, peer: int) -> bool:
        return peer in self.out

    def send(self, peer: int, header: Header, payload: memoryview | bytes = b"",
             deadline: float | None = None) -> None:
        if peer not in self.out:
            raise ConnectionResetError(f"no link to rank {peer}")
        target = self.net.target(peer)
        self.net.count(header.type.name.lower())
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) \
            else torch.empty(0, dtype=torch.uint8)
        target._on_frame(header, data)

    def drop(self, peer: int, sock: object = None) -> int | None:
        self.out.discard(peer)
        return None

    def leave(self, peer: int) -> None:
        self.out.discard(peer)

    def drop_incoming(self, peer: int) -> None:
        pass  # incoming links are the senders' outgoing ones

    def has_incoming(self, peer: int) -> bool:
        return peer in self.net.live and self.rt.rank in self.net.live[peer].transport.out

    def interrupt(self) -> None:
        pass

    def close(self, goodbye: bool = False) -> None:
        self.out.clear()


class NoSharedMemory:
    """What GroupRuntime uses of ShmHost, for ranks that share no memory."""

    mine = None

    def regions_for(self, participants: tuple[int, ...], timeout: float) -> None:
        return None

    def prepare(self, peer: int, timeout: float) -> None:
        pass

    def forget(self, peer: int) -> None:
        pass

    def forget_all(self) -> None:
        pass

    def membership_changed(self) -> None:
        pass

    def wake_all(self) -> None:
        pass

    def close(self) -> None:
        pass


class SimRank(GroupRuntime):
    """A GroupRuntime whose data plane is SimLinks (see the module docstring)."""

    def __init__(self, net: SimNet, store: Any, rank: int, world: int, slots: int,
                 timeout: float, extension: bool = False) -> None:
        self.net = net
        super().__init__(store, rank, world, "sim", timeout,
                         Options(max_group_size=slots, is_extension=extension,
                                 failure_timeout=timeout))

    def _open_data_plane(self, secret: bytes) -> tuple[Any, Any]:
        return NoSharedMemory(), SimLinks(self.net, self)

    def _start_threads(self) -> None:
        pass  # links: see link_all; liveness: nothing is silent in a simulation

    def link_all(self, peers: list[int]) -> None:
        """The links _connect_all opens at start (not counted: they exist before a failure)."""
        self.transport.out.update(p for p in peers if p != self.rank)

    def _event(self, kind: str, level: int = logging.INFO, **fields: object) -> None:
        super()._event(kind, level, **fields)
        if kind == "joiner_ready":
            with self.net.ready:
                self.net.ready_count += 1
                self.net.ready.notify_all()

    def agree_on_ranks(self, ranks: list[int], kind_code: int) -> set[int]:
        """The MEMBERSHIP exchange is data plane: here every member asked for `ranks`."""
        self.refuse(Call.MEMBERSHIP)
        self._seq += 1
        return set(ranks)


class Scenario:
    """One size: set up N ranks, fail one, join its replacement; measure each decision."""

    def __init__(self, n: int, clients: list[dist.Store], timeout: float) -> None:
        self.n, self.timeout = n, timeout
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.clients = [CountingStore(dist.PrefixStore(f"sim{n}", c), self.counts, self.lock)
                        for c in clients]
        self.net = SimNet()
        self.ranks: list[SimRank] = []

    def store_for(self, rank: int) -> CountingStore:
        return self.clients[rank % (len(self.clients) - 1)]  # the last one: the joiner's

    def setup(self) -> None:
        for r in range(self.n):
            rt = SimRank(self.net, self.store_for(r), r, self.n, self.n, self.timeout)
            self.net.live[r] = rt
            self.ranks.append(rt)
        for rt in self.ranks:
            rt.link_all(list(range(self.n)))

    def _snapshot(self) -> tuple[Counter, Counter, float, float]:
        return (Counter(self.counts), Counter(self.net.messages), time.perf_counter(),
                time.process_time())

    def _since(self, before: tuple[Counter, Counter, float, float],
               ranks: int) -> dict[str, Any]:
        ops, msgs, t0, c0 = before
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        d_ops, d_msgs = self.counts - ops, self.net.messages - msgs
        return {"store_ops": sum(d_ops.values()), "store_by_op": dict(d_ops),
                "messages": sum(d_msgs.values()), "messages_by_kind": dict(d_msgs),
                "wall_s": wall, "cpu_s": cpu, "per_rank_us": wall / ranks * 1e6}

    def fail_one(self, victim: int) -> dict[str, Any]:
        dead = self.net.live.pop(victim)
        survivors = [rt for rt in self.ranks if rt is not dead]
        before = self._snapshot()
        for rt in survivors:
            rt._on_lost(victim, "peer closed the connection", dead.incarnation)
            rt.prepare()
        out = self._since(before, len(survivors))
        views = {rt.view for rt in survivors}  # equal: same epoch, members and start
        out["agreed"] = len(views) == 1 and not survivors[0].view.is_active(victim)
        self.ranks = survivors
        return out

    def join_one(self, slot: int) -> dict[str, Any]:
        joiner = SimRank(self.net, self.clients[-1], slot, self.n, self.n, self.timeout,
                         extension=True)
        self.net.live[slot] = joiner
        members = list(self.ranks)
        result: dict[str, Any] = {}

        def join() -> None:
            try:
                result["view"] = joiner.join(self.timeout)
            except Exception as exc:  # noqa: BLE001 - reported by the driver below
                result["error"] = exc

        before = self._snapshot()
        t = threading.Thread(target=join, name="scale-sim-joiner", daemon=True)
        t.start()
        with self.net.ready:  # every member linked back: the joiner counts as ready
            if not self.net.ready.wait_for(lambda: self.net.ready_count >= len(members)
                                           or "error" in result, self.timeout):
                raise TimeoutError(f"{len(members)} members did not all link back to the "
                                   f"joiner within {self.timeout:.0f}s")
        for rt in members:  # the link-back threads end right after counting the joiner ready
            for h in list(rt._helpers):
                h.join(self.timeout)
        linked = self._snapshot()
        # the readiness digests every member hears in an all-to-all collective's frames
        digests = {rt.rank: rt.state.joiners.digest for rt in members}
        for rt in members:
            heard = dict(digests)
            del heard[rt.rank]
            rt._agree_ready(SimpleNamespace(failed=set(), peers=list(heard), heard_ready=heard,
                                            ready=digests[rt.rank]))
        agreed = self._snapshot()
        admitted = [rt.activate([slot])[1] for rt in members]
        t.join(self.timeout)
        if "error" in result or t.is_alive():
            raise RuntimeError(f"the joiner did not join: {result.get('error', 'timed out')}")
        out = self._since(before, len(members) + 1)
        out["link_s"] = linked[2] - before[2]
        out["agree_s"] = agreed[2] - linked[2]
        out["admit"] = self._since(agreed, len(members) + 1)
        self.ranks = sorted(members + [joiner], key=lambda rt: rt.rank)
        views = {rt.view for rt in self.ranks}
        out["agreed"] = (len(views) == 1 and self.ranks[0].view.is_active(slot)
                         and all(a == [slot] for a in admitted))
        return out

    def close(self) -> None:
        for rt in self.ranks:
            rt.destroy()


def run_size(n: int, clients: list[dist.Store], timeout: float) -> dict[str, Any]:
    sc = Scenario(n, clients, timeout)
    try:
        t0 = time.perf_counter()
        sc.setup()
        setup_s = time.perf_counter() - t0
        victim = n // 2
        fail = sc.fail_one(victim)
        join = sc.join_one(victim)
        view: View = sc.ranks[0].view
        return {"ranks": n, "setup_s": setup_s, "failure": fail, "join": join,
                "final_epoch": view.epoch, "view_bytes": len(view.encode())}
    finally:
        sc.close()


def _ratio(rows: list[dict], i: int, get: Callable[[dict], float]) -> str:
    """This row's value over the previous size's (2.00 per doubling: linear)."""
    if i == 0:
        return "-"
    a, b = get(rows[i - 1]), get(rows[i])
    return num(b / a if a else None, ".2f")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of sizes: {text!r}") \
            from None
    bad = [n for n in sizes if not 4 <= n <= MAX_SLOTS]
    if not sizes or bad:
        raise argparse.ArgumentTypeError(f"sizes must be 4..{MAX_SLOTS}, got {text!r}")
    return sizes


TABLE = Table(Column("ranks"), Column("decision", left=True), Column("store ops"),
              Column("messages"), Column("wall ms"), Column("cpu ms"), Column("per rank us"),
              Column("ops x"), Column("msgs x"), Column("wall x"), Column("agreed", left=True))


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for what in ("failure", "join"):
        for i, r in enumerate(results):
            d = r[what]
            rows.append([str(r["ranks"]), what, str(d["store_ops"]), str(d["messages"]),
                         num(d["wall_s"] * 1e3, ".1f"), num(d["cpu_s"] * 1e3, ".1f"),
                         num(d["per_rank_us"], ".0f"),
                         _ratio(results, i, lambda x, w=what: x[w]["store_ops"]),
                         _ratio(results, i, lambda x, w=what: x[w]["messages"]),
                         _ratio(results, i, lambda x, w=what: x[w]["wall_s"]),
                         "yes" if d["agreed"] else "NO"])
    return rows


def superlinear(results: list[dict]) -> list[str]:
    """Counts that grow faster than linearly: the cost of each added rank (the slope between
    two sizes) must not rise from one pair of sizes to the next. (Counts of the form a*N + b
    have ratios below 2 per doubling or above it, depending on b; their slope is a.)"""
    bad = []
    rows = sorted(results, key=lambda r: r["ranks"])
    for what in ("failure", "join"):
        for key in ("store_ops", "messages"):
            slopes = [((b[what][key] - a[what][key]) / (b["ranks"] - a["ranks"]), b["ranks"])
                      for a, b in zip(rows, rows[1:], strict=False)]
            for (s0, _), (s1, n) in zip(slopes, slopes[1:], strict=False):
                if s1 > s0 * SLOPE_LIMIT + 0.5:
                    bad.append(f"{what} {key}: {s0:.2f} per added rank below, {s1:.2f} up to "
                               f"{n} ranks")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="elasticpg scale-sim", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=_sizes, default=list(SIZES),
                   help="comma-separated group sizes (default 64,128,256,512,1024)")
    p.add_argument("--clients", type=int, default=4,
                   help="store client connections the members share (default 4; the joiner "
                        "has one of its own)")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on every wait (s)")
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--markdown", help="write the table here, as Markdown")
    args = p.parse_args(argv)
    check_output_dirs(p, args.json, args.markdown)
    if args.clients < 1 or not args.timeout > 0:
        p.error("--clients must be at least 1 and --timeout positive")
    events = logging.getLogger("elasticpg")
    level = events.level
    events.setLevel(logging.ERROR)  # a thousand peer_failed warnings are not the output
    server, port = listen_store(1, args.timeout)
    td = timedelta(seconds=args.timeout)
    clients = [dist.TCPStore(HOST, port, is_master=False, timeout=td)
               for _ in range(args.clients + 1)]
    results = []
    try:
        for n in args.ranks:
            results.append(run_size(n, clients, args.timeout))
            print(f"{n} ranks: failure {results[-1]['failure']['wall_s'] * 1e3:.1f} ms, "
                  f"join {results[-1]['join']['wall_s'] * 1e3:.1f} ms "
                  f"(setup {results[-1]['setup_s']:.1f} s)", flush=True)
    finally:
        events.setLevel(level)
        del clients, server
    rows = table_rows(results)
    print()
    print(TABLE.text(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(TABLE.markdown(rows) + "\n")
    problems = [f"{r['ranks']} ranks: {w} did not end in one agreed view"
                for r in results for w in ("failure", "join") if not r[w]["agreed"]]
    problems += superlinear(results)
    at = [r for r in results if r["ranks"] == TARGET_RANKS]
    if at:
        f = at[0]["failure"]
        print(f"\ntarget: failure -> one agreed view at {TARGET_RANKS} ranks in under "
              f"{TARGET_S:.0f} s: {f['wall_s'] * 1e3:.0f} ms wall, {f['cpu_s'] * 1e3:.0f} ms cpu "
              f"({'met' if f['wall_s'] < TARGET_S and f['agreed'] else 'NOT met'})")
    for line in problems:
        print(f"elasticpg scale-sim: {line}")
    return 1 if problems else 0
