"""`elasticpg run`'s command line: torchrun's interface, plus the restart policy.

Parsing is pure (no processes, no sockets): `parse_args` returns a LaunchConfig or exits with
an argparse usage error (status 2) that names the bad option. torchrun's spellings with
underscores (`--nproc_per_node`) are accepted too.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ..cli.launching import cpu_count
from .environment import WorkerSlot
from .policy import RestartPolicy
from .store import StoreSpec, parse_store, with_prefix

PROG = "elasticpg run"


@dataclass(frozen=True)
class LaunchConfig:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    store: StoreSpec | None  # None: host a TCPStore in the launcher
    policy: RestartPolicy
    min_workers: int
    grace_period: float  # after forwarding a stop signal, SIGKILL whoever is left
    store_timeout: float
    run_id: str
    command: tuple[str, ...]  # what each worker runs

    def slots(self) -> list[WorkerSlot]:
        return [WorkerSlot(i, self.nproc_per_node, self.node_rank, self.nnodes)
                for i in range(self.nproc_per_node)]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _nproc(text: str) -> int:
    return cpu_count() if text in ("auto", "cpu") else _positive_int(text)


def _store(text: str) -> StoreSpec:
    try:
        return parse_store(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Run a torch.distributed script on N workers per node, like "
        "torchrun; when a worker dies, restart only that worker, as a replacement that warms "
        "up in isolation and joins the live group (the others never stop).",
        epilog="exit status: 0 all finished, 1 launcher error, 2 usage, 3 gave up on a slot, "
        "4 too few ranks left, 128+N interrupted by signal N (130 Ctrl-C, 143 SIGTERM)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=_nproc, default=1,
                   metavar="N", help="workers on this node (or 'auto': one per CPU)")
    p.add_argument("--nnodes", type=_positive_int, default=1, metavar="M",
                   help="nodes in the job, one launcher each (default 1)")
    p.add_argument("--node-rank", "--node_rank", type=_count, default=0, metavar="I",
                   help="this node's index, 0..M-1; its workers are ranks I*N..I*N+N-1")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--store", type=_store, default=None, metavar="HOST:PORT|URL",
                       help="the store every worker rendezvouses on: a TCPStore at HOST:PORT "
                       "(or tcp://HOST:PORT), or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] "
                       "(the job's key prefix, default elasticpg-RUN_ID); default: a "
                       "TCPStore hosted by this launcher")
    where.add_argument("--standalone", action="store_true",
                       help="host the store in this launcher (the default; as torchrun)")
    p.add_argument("--max-restarts", "--max_restarts", type=_count, default=3, metavar="K",
                   help="restarts per slot before it is given up on (default 3)")
    p.add_argument("--restart-delay", type=_seconds, default=1.0, metavar="S",
                   help="wait before a slot's first restart, doubled for each further one "
                   "(default 1 s)")
    p.add_argument("--max-restart-delay", type=_seconds, default=30.0, metavar="S",
                   help="cap on that wait (default 30 s)")
    p.add_argument("--min-workers", type=_count, default=1, metavar="N",
                   help="stop the run when fewer of this node's slots than this are left "
                   "after giving up on one (default 1)")
    p.add_argument("--grace-period", type=_seconds, default=10.0, metavar="S",
                   help="after forwarding Ctrl-C / SIGTERM, SIGKILL workers still running "
                   "after this long (default 10 s)")
    p.add_argument("--store-timeout", type=_seconds, default=60.0, metavar="S",
                   help="how long an external --store may take to answer (default 60 s)")
    p.add_argument("--run-id", "--rdzv-id", "--rdzv_id", default=None, metavar="ID",
                   help="job id given to workers as TORCHELASTIC_RUN_ID (default: random)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("-m", "--module", action="store_true",
                     help="run the script as a module (python -m), as torchrun -m")
    how.add_argument("--no-python", "--no_python", action="store_true",
                     help="run the script as an executable, not through this Python")
    p.add_argument("script", help="the worker's script (or module, or executable)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def parse_args(argv: Sequence[str] | None = None) -> LaunchConfig:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.node_rank >= args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1} "
                     f"(--nnodes {args.nnodes})")
    if args.nnodes > 1 and args.store is None:
        parser.error("--nnodes > 1 needs --store HOST:PORT: a store every node's launcher "
                     "can reach (a launcher's own store listens on 127.0.0.1 only)")
    if (args.nnodes > 1 and args.store.scheme == "etcd" and not args.store.prefix
            and args.run_id is None):
        parser.error("--nnodes > 1 with an etcd store needs a key prefix every node's "
                     "launcher agrees on: etcd://HOST:PORT,.../PREFIX or --run-id ID")
    if args.min_workers > args.nproc_per_node:
        parser.error(f"--min-workers {args.min_workers} is more than this node's "
                     f"--nproc-per-node {args.nproc_per_node}")
    if args.grace_period <= 0:
        parser.error("--grace-period must be more than 0 seconds")
    if args.store_timeout <= 0:
        parser.error("--store-timeout must be more than 0 seconds")
    if args.no_python:
        command = (args.script, *args.script_args)
    elif args.module:
        command = (sys.executable, "-m", args.script, *args.script_args)
    else:
        command = (sys.executable, args.script, *args.script_args)
    if not args.module and not args.no_python and not os.path.isfile(args.script):
        parser.error(f"script {args.script!r} not found")
    policy = RestartPolicy(args.max_restarts, args.restart_delay, args.max_restart_delay)
    run_id = args.run_id or uuid.uuid4().hex[:12]
    store = with_prefix(args.store, run_id) if args.store is not None else None
    return LaunchConfig(
        nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
        store=store, policy=policy, min_workers=args.min_workers,
        grace_period=args.grace_period, store_timeout=args.store_timeout,
        run_id=run_id, command=tuple(command))
