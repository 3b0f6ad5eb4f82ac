"""Median latency of c10d store operations, side by side in one run: a TCPStore (server in this
process) and EtcdStore (a 3-member etcd on loopback, tests/etcd_cluster.py).

Run: .venv/bin/python -m tests.etcd_latency [N]   (not a test: a measurement)
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from elasticpg.cli.launching import listen_store
from elasticpg.control.etcd_store import EtcdStore

from .etcd_cluster import EtcdCluster


def median_ms(fn: Callable[[int], object], n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(n: int) -> None:
    ops: dict[str, Callable[[dist.Store], Callable[[int], object]]] = {
        "set": lambda s: lambda i: s.set(f"k{i}", "v"),
        "get": lambda s: lambda i: s.get(f"k{i}"),
        "check": lambda s: lambda i: s.check([f"k{i}"]),
        "add": lambda s: lambda i: s.add("counter", 1),
        "compare_set": lambda s: lambda i: s.compare_set(f"view/{i}", "", "x"),
    }
    cluster = EtcdCluster(3)
    try:
        _server, port = listen_store(1, 30)
        tcp = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        etcd = EtcdStore(cluster.endpoints, uuid.uuid4().hex, timeout=timedelta(seconds=30))
        print(f"{'op':<12} {'TCPStore ms':>12} {'EtcdStore ms':>13} {'ratio':>8}  (median of {n})")
        for name, make in ops.items():
            a, b = median_ms(make(tcp), n), median_ms(make(etcd), n)
            print(f"{name:<12} {a:12.3f} {b:13.3f} {b / a:7.0f}x")
    finally:
        cluster.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
