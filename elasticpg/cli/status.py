"""`elasticpg status STORE`: what every elasticpg group in a store has decided, read from the store
alone (no rank is asked, so it works while ranks are dead, hung or not yet started).

STORE is a TCPStore (``HOST:PORT`` or ``tcp://HOST:PORT``, e.g. `elasticpg store-server` or
the launcher's) or an etcd URL (``etcd://HOST:PORT[,HOST:PORT...]/PREFIX``). Groups are found
by their ``founders`` key (control/group_store.py names every key read here); each one's
current view is the latest decided epoch (epoch 0: the founding view, nothing decided yet).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from ..control.group_store import WAITING
from ..core.membership import MemberState, View
from .tables import Column, Table

FOUNDERS = "founders"


def open_store(text: str, timeout: float) -> Any:
    """A client of the store named by `text` (raises ValueError for a malformed address)."""
    import torch.distributed as dist

    if text.startswith("etcd://"):
        from ..control.etcd_store import EtcdStore, parse_url

        endpoints, prefix = parse_url(text)
        return EtcdStore(endpoints, prefix, timeout=timedelta(seconds=timeout))
    from ..launcher.store import parse_store

    spec = parse_store(text)
    if spec.scheme != "tcp":
        raise ValueError(f"{text!r}: an etcd URL needs a key prefix: etcd://HOST:PORT/PREFIX")
    (host, port), = spec.endpoints
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)


def _keys(store: Any) -> list[str]:
    keys = store.keys() if hasattr(store, "keys") else store.list_keys()
    return [k.decode() if isinstance(k, bytes) else k for k in keys]


def _group_name(prefix: str) -> str:
    """torch's nested PrefixStores ("default_pg/0//cpu//") as a readable name."""
    parts = [p for p in prefix.split("/") if p]
    return "/".join(parts) or "(root)"


def _rank_state(member: MemberState, joins: list[dict]) -> str:
    """One word per slot: its view state, or where its newest join attempt stands."""
    last = joins[-1]["state"] if joins else None
    if member is not MemberState.ACTIVE and last == WAITING:
        return "joining"
    if member is not MemberState.ACTIVE and last and last.startswith("admitting"):
        return "admitting"
    return {MemberState.ACTIVE: "active", MemberState.INACTIVE: "inactive",
            MemberState.NONE: "never-joined"}[member]


def group_status(store: Any, prefix: str, keys: set[str]) -> dict:
    """The status of the group whose keys start with `prefix`."""
    def get(name: str) -> str:
        return store.get(prefix + name).decode()

    founders = int(get(FOUNDERS))
    ranks: dict[int, dict] = {}
    joins: dict[int, list[dict]] = {}
    for k in sorted(keys):
        if not k.startswith(prefix):
            continue
        parts = k[len(prefix):].split("/")
        if parts[0] in ("inc", "ep") and len(parts) == 2 and parts[1].isdigit():
            ranks.setdefault(int(parts[1]), {})[parts[0]] = get(f"{parts[0]}/{parts[1]}")
        elif parts[0] == "join" and len(parts) == 3 and parts[1].isdigit():
            inc, _, attempt = parts[2].partition(".")
            state = get("/".join(parts))
            joined = prefix + f"joined/{parts[1]}/{parts[2]}"
            entry = {"incarnation": int(inc), "attempt": int(attempt), "state": state,
                     "activated_in": (View.decode(store.get(joined)).epoch
                                      if joined in keys else None)}
            joins.setdefault(int(parts[1]), []).append(entry)
    latest = int(get("view/latest")) if prefix + "view/latest" in keys else 0
    # the founders' announced capacity; older stores lack it: the slots seen in use
    slots = (int(get("slots")) if prefix + "slots" in keys else
             max([founders, *(r + 1 for r in ranks), *(r + 1 for r in joins)]))
    view = (View.decode(store.get(prefix + f"view/{latest}")) if latest
            else View.initial(slots, range(founders)))
    rows = []
    for r in range(view.size):
        info, mine = ranks.get(r, {}), sorted(joins.get(r, []),
                                              key=lambda j: (j["incarnation"], j["attempt"]))
        ep = info.get("ep")
        rows.append({
            "rank": r, "member": view.members[r].name.lower(),
            "state": _rank_state(view.members[r], mine),
            "incarnations": int(info["inc"]) if "inc" in info else 0,
            "endpoint": ep.rsplit(":", 1)[0] if ep else None,
            "joins": mine,
        })
    waiting = [row["rank"] for row in rows if row["state"] == "joining"]
    return {
        "group": _group_name(prefix), "epoch": view.epoch, "founders": founders,
        "active": list(view.active), "active_mask": view.mask(),
        "members": [s.name.lower() for s in view.members], "start_seq": view.start_seq,
        "last_decision": ({"epoch": view.epoch, "cause": view.cause,
                           "start_seq": view.start_seq} if latest else None),
        "joiners_waiting": waiting, "ranks": rows,
    }


def collect(store: Any) -> list[dict]:
    """Every group's status, in name order."""
    keys = set(_keys(store))
    prefixes = sorted(k[:-len(FOUNDERS)] for k in keys
                      if k.endswith(FOUNDERS) and k[:-len(FOUNDERS)].endswith("/"))
    return [group_status(store, p, keys) for p in prefixes]


RANKS = Table(Column("rank"), Column("state", left=True), Column("member", left=True),
              Column("incarnations"), Column("endpoint", left=True),
              Column("join attempts", left=True))


def _join_text(j: dict) -> str:
    """incarnation.attempt and where it stands ("admitted in epoch E" once activated)."""
    where = (f"admitted in epoch {j['activated_in']}" if j["activated_in"] is not None
             else j["state"])
    return f"{j['incarnation']}.{j['attempt']} {where}"


def render(groups: list[dict], where: str) -> str:
    if not groups:
        return f"no elasticpg group in {where}"
    out = []
    for g in groups:
        last = g["last_decision"]
        decided = (f"epoch {last['epoch']} from op {last['start_seq']}: "
                   f"{last['cause'] or '(no cause recorded)'}" if last
                   else "none yet (the founding view)")
        out += [f"group {g['group']}: epoch {g['epoch']}, active "
                f"{''.join(map(str, g['active_mask']))} ({len(g['active'])} of "
                f"{len(g['members'])}), joiners waiting: "
                f"{g['joiners_waiting'] or 'none'}",
                f"  last decision: {decided}"]
        rows = [[str(r["rank"]), r["state"], r["member"], str(r["incarnations"]),
                 r["endpoint"] or "-",
                 ", ".join(map(_join_text, r["joins"])) or "-"] for r in g["ranks"]]
        out += ["  " + line.rstrip() for line in RANKS.text(rows).splitlines()]
        out.append("")
    return "\n".join(out).rstrip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="elasticpg status",
                                description="Every elasticpg group's current view, from the "
                                            "store.")
    p.add_argument("store", help="HOST:PORT, tcp://HOST:PORT or etcd://HOST:PORT[,...]/PREFIX")
    p.add_argument("--json", action="store_true", help="one JSON object (a list of groups) "
                                                       "per refresh instead of tables")
    p.add_argument("--watch", type=float, metavar="SECONDS", default=None,
                   help="refresh every SECONDS until interrupted")
    p.add_argument("--count", type=int, default=0,
                   help="with --watch: stop after this many refreshes (0: never)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to reach the store (default %(default)s)")
    args = p.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        p.error("--watch needs a positive number of seconds")
    if args.count < 0 or args.timeout <= 0:
        p.error("--count must be >= 0 and --timeout positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        store = open_store(args.store, args.timeout)
    except ValueError as exc:
        print(f"elasticpg status: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:  # DistError derives from RuntimeError
        print(f"elasticpg status: cannot reach the store {args.store}: {exc}", file=sys.stderr)
        return 1
    shown = 0
    try:
        while True:
            try:
                groups = collect(store)
            except (RuntimeError, OSError) as exc:
                print(f"elasticpg status: reading {args.store} failed: {exc}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(groups), flush=True)
            else:
                if args.watch is not None and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")  # clear the screen between refreshes
                stamp = time.strftime("%H:%M:%S") if args.watch is not None else ""
                print((f"[{stamp}] {args.store}\n" if stamp else "")
                      + render(groups, args.store), flush=True)
            shown += 1
            if args.watch is None or (args.count and shown >= args.count):
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    finally:
        if hasattr(store, "close"):
            store.close()
