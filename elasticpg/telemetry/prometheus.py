"""Prometheus export of every live group handle's metrics (needs the `metrics` extra).

One collector renders the snapshots of the groups registered here (labels `group`, `rank`),
so a process serves all its groups on one endpoint. `serve` starts that endpoint (one HTTP
server per process, started by the first group that asks, stopped when the last one that
asked is destroyed); `collector()` lets an application that already serves Prometheus add
elasticpg's metrics to its own registry instead.

Where: `Options.metrics_port` or `$ELASTICPG_METRICS_PORT` (0: any free port; P: port P +
$LOCAL_RANK, so the ranks of one host never collide), on `Options.metrics_host` or
`$ELASTICPG_METRICS_HOST` (default 127.0.0.1: exposing it beyond the host is a decision).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("elasticpg.telemetry")

_lock = threading.Lock()
_sources: dict[int, Callable[[], dict[str, Any]]] = {}  # id(runtime) -> its snapshot function
_served: set[int] = set()  # sources that asked for the endpoint
_server: Any = None
_thread: threading.Thread | None = None


def _prom() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # noqa: F401  (the metric families live there)
    except ImportError:
        raise ImportError("metrics export needs prometheus_client: pip install "
                          "'elasticpg[metrics]'") from None
    return prometheus_client


def env_port() -> int | None:
    """$ELASTICPG_METRICS_PORT as a port number (0: any free port), None when unset."""
    raw = os.environ.get("ELASTICPG_METRICS_PORT", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"ELASTICPG_METRICS_PORT must be a port number, got {raw!r}")
    return int(raw)


class _Collector:
    """prometheus_client custom collector over the registered snapshots."""

    def collect(self) -> Iterator[Any]:
        core = _prom().core
        base = ["group", "rank"]

        def family(kind: str, name: str, doc: str, *extra: str) -> Any:
            cls = core.CounterMetricFamily if kind == "counter" else core.GaugeMetricFamily
            return cls(f"elasticpg_{name}", doc, labels=[*base, *extra])

        ops = family("counter", "operations", "Operations completed, by kind", "kind")
        nbytes = family("counter", "operation_bytes",
                        "Bytes of the tensors passed to operations, by kind", "kind")
        secs = family("counter", "operation_seconds", "Time spent in operations, by kind",
                      "kind")
        last = family("gauge", "last_operation_seconds",
                      "Latency of the last operation of each kind", "kind")
        fails = family("counter", "peer_failures",
                       "Peers declared failed, by how it was noticed", "how")
        views = family("counter", "view_changes", "Views applied")
        timeouts = family("counter", "operation_timeouts", "Operations that timed out")
        mism = family("counter", "mismatches", "Collective mismatches seen")
        rejected = family("counter", "rejected_connections",
                          "Data-plane connections that failed authentication")
        epoch = family("gauge", "epoch", "Epoch of the applied view")
        active = family("gauge", "active_ranks", "Active ranks in the applied view")
        with _lock:
            sources = list(_sources.values())
        for snap in (f() for f in sources):
            lab = [snap["group"], str(snap["rank"])]
            for kind, n in snap["operations"].items():
                ops.add_metric([*lab, kind], n)
                nbytes.add_metric([*lab, kind], snap["bytes"][kind])
                secs.add_metric([*lab, kind], snap["seconds"][kind])
                last.add_metric([*lab, kind], snap["last_op_seconds"][kind])
            for how, n in snap["peer_failures"].items():
                fails.add_metric([*lab, how], n)
            views.add_metric(lab, snap["view_changes"])
            timeouts.add_metric(lab, snap["op_timeouts"])
            mism.add_metric(lab, snap["mismatches"])
            rejected.add_metric(lab, snap["rejected_connections"])
            epoch.add_metric(lab, snap["epoch"])
            active.add_metric(lab, len(snap["active_ranks"]))
        yield from (ops, nbytes, secs, last, fails, views, timeouts, mism, rejected, epoch,
                    active)


def collector() -> _Collector:
    """A collector for an application's own registry (`REGISTRY.register(collector())`)."""
    _prom()
    return _Collector()


def register(key: int, snapshot: Callable[[], dict[str, Any]]) -> None:
    """Make a group's metrics visible to every collector (and the endpoint, if running)."""
    with _lock:
        _sources[key] = snapshot


def unregister(key: int) -> None:
    """The group is destroyed: drop it, and stop the endpoint once nobody asked for it."""
    global _server, _thread
    with _lock:
        _sources.pop(key, None)
        _served.discard(key)
        server, thread = (_server, _thread) if not _served else (None, None)
        if server is not None:
            _server = _thread = None
    if server is not None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)


def serve(key: int, port: int, host: str) -> tuple[str, int]:
    """Serve the metrics of this process's groups on host:port (see the module docstring);
    returns the address it is bound to. A later group shares the first one's server."""
    global _server, _thread
    prom = _prom()
    with _lock:
        _served.add(key)
        if _server is None:
            if port:
                port += int(os.environ.get("LOCAL_RANK", "0") or 0)
            registry = prom.CollectorRegistry(auto_describe=False)
            registry.register(_Collector())
            try:
                _server, _thread = prom.start_http_server(port, addr=host, registry=registry)
            except OSError as exc:
                _served.discard(key)
                raise OSError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        return _endpoint_locked()


def _endpoint_locked() -> tuple[str, int]:
    host, port = _server.server_address[:2]
    return host, port


def endpoint() -> tuple[str, int] | None:
    """(host, port) of this process's metrics endpoint, None when none runs."""
    with _lock:
        return _endpoint_locked() if _server is not None else None
