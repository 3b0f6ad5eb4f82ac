"""Counters of one group handle: what it did, how much, how fast, and what went wrong.

Kept as plain Python integers and floats in per-kind lists, updated on the caller's thread
(operations) or under the runtime's lock (failures): a collective pays two list increments, a
float store and one `perf_counter` call, so the counters are always on. Gauges (epoch, active
ranks) are not stored at all: a snapshot reads them from the runtime when asked. `snapshot`
is what `elasticpg.metrics(group)` returns; the Prometheus exporter (`telemetry/prometheus.py`)
renders the same snapshots.
"""

from __future__ import annotations

import threading
from typing import Any

from ..core.framing import OpKind

# operation kinds by their OpKind value; RECV counts point-to-point receives (it has no wire code)
KIND_NAMES: tuple[str, ...] = tuple(k.name.lower() for k in OpKind) + ("recv",)
RECV = len(KIND_NAMES) - 1


class GroupMetrics:
    __slots__ = ("ops", "bytes", "seconds", "last_seconds", "last_kind", "failures",
                 "view_changes", "op_timeouts", "mismatches", "_recv_lock")

    def __init__(self) -> None:
        n = len(KIND_NAMES)
        self.ops = [0] * n
        self.bytes = [0] * n
        self.seconds = [0.0] * n  # total time spent in operations of each kind
        self.last_seconds = [0.0] * n  # latency of the last operation of each kind
        self.last_kind = 0
        self.failures: dict[str, int] = {}  # peers declared failed, by how they were noticed
        self.view_changes = 0
        self.op_timeouts = 0
        self.mismatches = 0
        self._recv_lock = threading.Lock()  # receives complete on several reader threads

    def op(self, kind: int, nbytes: int, seconds: float) -> None:
        """One operation of `kind` (an OpKind value, or RECV) finished."""
        self.ops[kind] += 1
        self.bytes[kind] += nbytes
        self.seconds[kind] += seconds
        self.last_seconds[kind] = seconds
        self.last_kind = kind

    def recv(self, nbytes: int, seconds: float) -> None:
        """A point-to-point receive completed (any thread); `seconds` since it was posted."""
        with self._recv_lock:
            self.op(RECV, nbytes, seconds)

    def failure(self, how: str) -> None:
        self.failures[how] = self.failures.get(how, 0) + 1

    def snapshot(self, **gauges: Any) -> dict[str, Any]:
        """A plain-data copy (safe to keep, print or serialise); `gauges` are added as they are."""
        used = [i for i, n in enumerate(self.ops) if n]
        return {
            **gauges,
            "operations": {KIND_NAMES[i]: self.ops[i] for i in used},
            "bytes": {KIND_NAMES[i]: self.bytes[i] for i in used},
            "seconds": {KIND_NAMES[i]: self.seconds[i] for i in used},
            "last_op_seconds": {KIND_NAMES[i]: self.last_seconds[i] for i in used},
            "last_op": KIND_NAMES[self.last_kind] if used else None,
            "peer_failures": dict(self.failures),
            "view_changes": self.view_changes,
            "op_timeouts": self.op_timeouts,
            "mismatches": self.mismatches,
        }
