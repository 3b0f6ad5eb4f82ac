"""The event log and the metrics, from real processes: a SIGKILLed rank, a planned removal and
an in-place rejoin, seen as JSON lines on every survivor; counters read from Python and
scraped from each rank's Prometheus endpoint."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

import elasticpg
from elasticpg import events
from elasticpg.telemetry.counters import GroupMetrics

from .harness import init_group, serving_steps


def _captured(fn: Callable[[], Any]) -> tuple[Any, list[dict]]:
    """Run fn with elasticpg's JSON-lines log going to a buffer; (its value, the records)."""
    root = logging.getLogger("elasticpg")
    level = root.level
    buf = io.StringIO()
    handler = events.log_events(buf, json_lines=True)
    try:
        value = fn()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return value, [json.loads(line) for line in buf.getvalue().splitlines()]


def _sum(x: float) -> float:
    t = torch.tensor([x])
    dist.all_reduce(t)
    return t.item()


def job_failure_leave_rejoin(rank: int, world: int, port: int) -> dict:
    """Rank 3 is SIGKILLed; the survivors go on, remove rank 2, and rank 2 rejoins in place."""

    def run() -> dict:
        init_group(rank, world, port, pg_options=elasticpg.Options(failure_timeout=5.0))
        dist.barrier()
        if rank == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        out = {"after_kill": _sum(1.0)}
        out["after_kill_again"] = _sum(1.0)  # the view without 3 is applied everywhere now
        elasticpg.deactivate_ranks(None, [2])
        if rank == 2:
            elasticpg.join_group(timeout=30)
        else:
            _sum(1.0)
            for _ in serving_steps():
                _sum(1.0)
                if elasticpg.get_peer_state(None, [2]) == [True]:
                    elasticpg.recover_ranks(None, [2])
                    break
        out["after_rejoin"] = _sum(1.0)
        out["metrics"] = elasticpg.metrics()
        dist.destroy_process_group()
        return out

    out, records = _captured(run)
    out["records"] = records
    return out


def _of(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("event") == kind]


def test_event_log_says_who_failed_whom_saw_it_why_and_every_view(pool):
    res = pool.run_raw(job_failure_leave_rejoin, world=4, timeout=90, victim=3)
    assert res[3].status in ("dead", "left alive")
    for r in (0, 1, 2):
        assert res[r].status == "ok", res[r].value
    outs = {r: res[r].value for r in (0, 1, 2)}
    seen_by = {}
    for r, out in outs.items():
        assert out["after_kill_again"] == 3.0 and out["after_rejoin"] == 3.0, out
        recs = out["records"]
        for rec in recs:  # every line is one self-describing JSON object
            assert isinstance(rec["time"], float) and rec["logger"].startswith("elasticpg")
        evs = [x for x in recs if "event" in x]
        assert out["metrics"]["group"] == outs[0]["metrics"]["group"]
        for rec in evs:
            assert rec["group"] == out["metrics"]["group"] and rec["rank"] == r, rec
            assert isinstance(rec.get("epoch"), int), rec
        # at most one report per observer (one that learnt of the exclusion from the
        # decision first may have none)
        failed = [x for x in _of(evs, "peer_failed") if x["peer"] == 3]
        assert len(failed) <= 1, failed
        for f in failed:
            # closed by the kernel: seen as EOF on a link, or as a refused/reset connect
            assert f["how"] in ("eof", "connect") and f["reason"], f
            # a link that closes only after the exclusion is reported as a non-member's
            assert (f["member"], f["epoch"], f["level"]) in (
                (True, 0, "WARNING"), (False, 1, "INFO")), f
            seen_by[r] = f["member"]
        applied = [(x["epoch"], x["active"]) for x in _of(evs, "view_applied")]
        assert applied[0] == (1, [0, 1, 2]), applied  # 3 excluded
        assert (2, [0, 1]) in applied and applied[-1] == (3, [0, 1, 2]), applied
        assert [x["ranks"] for x in _of(evs, "ranks_deactivated")] == [[2]]
    # every view was decided (several members may propose the identical view: the store holds
    # one), and the decision names what changed and who saw what
    decided: dict[int, dict] = {}
    for out in outs.values():
        for x in _of(out["records"], "view_decided"):
            key = {k: x[k] for k in ("active", "removed", "added", "cause")}
            assert decided.setdefault(x["epoch"], key) == key, (x, decided)
    assert sorted(decided) == [1, 2, 3], decided
    assert decided[1]["removed"] == [3] and decided[1]["active"] == [0, 1, 2]
    witness = int(decided[1]["cause"].split("seen by rank ")[1].rstrip(")"))
    assert seen_by.get(witness), (witness, seen_by)  # whoever the cause names saw it
    assert decided[2]["removed"] == [2] and decided[3]["added"] == [2]
    # the join, from both sides
    joiner = outs[2]["records"]
    assert _of(joiner, "join_started") and _of(joiner, "join_admitted")[0]["epoch"] == 3
    for r in (0, 1):
        assert [x["slot"] for x in _of(outs[r]["records"], "joiner_ready")] == [2]
        assert _of(outs[r]["records"], "ranks_activated")[0]["ranks"] == [2]
    # the same story in the counters
    for out in outs.values():
        m = out["metrics"]
        # (the removed rank 2 also sees the members leave its links: how "left")
        fails = {k: n for k, n in m["peer_failures"].items() if k != "left"}
        assert fails in ({}, {"eof": 1}, {"connect": 1}), m
        assert m["view_changes"] == 3, m
        assert m["epoch"] == 3 and m["active_ranks"] == [0, 1, 2], m
        assert m["operations"]["membership"] >= 1 and m["operations"]["allreduce"] >= 3, m


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def job_metrics_endpoint(rank: int, world: int, port: int, steps: int) -> dict:
    """Each rank serves its metrics on a free port; it scrapes itself after known traffic."""
    init_group(rank, world, port, pg_options=elasticpg.Options(metrics_port=0))
    host, mport = elasticpg.metrics_endpoint()
    for _ in range(steps):
        _sum(1.0)
    big = torch.ones(1000, dtype=torch.float64)
    dist.all_reduce(big)
    if rank == 0:
        dist.send(torch.ones(10), 1)
    elif rank == 1:
        dist.recv(torch.zeros(10), 0)
    dist.barrier()
    m = elasticpg.metrics()
    samples = _scrape(mport)
    dist.destroy_process_group()
    after = elasticpg.metrics_endpoint()
    try:
        _scrape(mport)
        stopped = False
    except OSError:
        stopped = True
    return {"host": host, "port": mport, "metrics": m, "samples": samples, "after": after,
            "stopped": stopped}


def test_metrics_from_python_and_from_each_ranks_prometheus_endpoint(pool):
    steps = 25
    res = pool.run(job_metrics_endpoint, steps, world=3, timeout=60)
    assert len({v["port"] for v in res}) == 3
    for rank, v in enumerate(res):
        m = v["metrics"]
        assert v["host"] == "127.0.0.1"
        assert m["operations"]["allreduce"] == steps + 1, m
        assert m["bytes"]["allreduce"] == steps * 4 + 1000 * 8, m
        assert m["operations"]["barrier"] == 1 and m["last_op"] == "barrier", m
        assert m["last_op_seconds"]["allreduce"] > 0 and m["epoch"] == 0, m
        if rank == 0:
            assert m["operations"]["send"] == 1 and m["bytes"]["send"] == 40, m
        if rank == 1:
            assert m["operations"]["recv"] == 1 and m["bytes"]["recv"] == 40, m
        s = v["samples"]

        def at(name: str, **labels: str) -> float:
            labels.update(group=m["group"], rank=str(rank))  # noqa: B023 (called at once)
            return s[(name, tuple(sorted(labels.items())))]  # noqa: B023

        assert at("elasticpg_operations_total", kind="allreduce") == steps + 1
        assert at("elasticpg_operation_bytes_total", kind="allreduce") == m["bytes"]["allreduce"]
        assert at("elasticpg_epoch") == 0 and at("elasticpg_active_ranks") == 3
        assert at("elasticpg_view_changes_total") == 0
        assert at("elasticpg_last_operation_seconds", kind="allreduce") > 0
        # destroying the only group that asked for the endpoint stops it
        assert v["after"] is None and v["stopped"]


def test_counters_snapshot_is_plain_data_and_counts_by_kind():
    m = GroupMetrics()
    m.op(2, 16, 0.5)
    m.op(2, 16, 0.25)
    m.failure("silence")
    snap = m.snapshot(epoch=4)
    assert snap["operations"] == {"allreduce": 2} and snap["bytes"] == {"allreduce": 32}
    assert snap["seconds"] == {"allreduce": 0.75}
    assert snap["last_op_seconds"] == {"allreduce": 0.25} and snap["last_op"] == "allreduce"
    assert snap["peer_failures"] == {"silence": 1} and snap["epoch"] == 4
    json.dumps(snap)  # serialisable as it is


def test_elasticpg_log_env_turns_the_json_log_on(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    root = logging.getLogger("elasticpg")
    level, handlers = root.level, list(root.handlers)
    monkeypatch.setenv("ELASTICPG_LOG", "json")
    try:
        events.configure_from_env()
        events.emit("peer_failed", "g", 1, logging.WARNING, peer=2, how="silence", epoch=5)
    finally:
        for h in root.handlers[len(handlers):]:
            root.removeHandler(h)
        root.setLevel(level)
    rec = json.loads(buf.getvalue().strip())
    assert rec["event"] == "peer_failed" and rec["peer"] == 2 and rec["epoch"] == 5
    monkeypatch.setenv("ELASTICPG_LOG", "yaml")
    with pytest.raises(ValueError, match="ELASTICPG_LOG"):
        events.configure_from_env()


def test_metrics_port_must_be_a_port():
    with pytest.raises(ValueError, match="metrics_port"):
        elasticpg.Options(metrics_port=70000).validate(2)


def test_metrics_port_from_the_environment(monkeypatch):
    from elasticpg.telemetry import prometheus

    monkeypatch.delenv("ELASTICPG_METRICS_PORT", raising=False)
    assert prometheus.env_port() is None
    monkeypatch.setenv("ELASTICPG_METRICS_PORT", "0")
    assert prometheus.env_port() == 0
    monkeypatch.setenv("ELASTICPG_METRICS_PORT", "http")
    with pytest.raises(ValueError, match="ELASTICPG_METRICS_PORT"):
        prometheus.env_port()


def test_one_endpoint_per_process_serves_every_group_until_the_last_asker_goes():
    from elasticpg.telemetry import prometheus

    a, b = GroupMetrics(), GroupMetrics()
    a.op(2, 4, 0.1)
    b.op(1, 8, 0.2)

    def snap(m: GroupMetrics, group: str):
        return lambda: m.snapshot(group=group, rank=0, epoch=0, active_ranks=[0],
                                  rejected_connections=0)

    prometheus.register(1, snap(a, "ga"))
    prometheus.register(2, snap(b, "gb"))
    try:
        _, port = prometheus.serve(1, 0, "127.0.0.1")
        assert prometheus.serve(2, 0, "127.0.0.1") == ("127.0.0.1", port)  # shared
        s = _scrape(port)
        assert s[("elasticpg_operations_total",
                  (("group", "ga"), ("kind", "allreduce"), ("rank", "0")))] == 1
        assert s[("elasticpg_operation_bytes_total",
                  (("group", "gb"), ("kind", "broadcast"), ("rank", "0")))] == 8
        prometheus.unregister(1)
        assert prometheus.endpoint() == ("127.0.0.1", port)  # group 2 still wants it
        assert not any(k[1] and ("group", "ga") in k[1] for k in _scrape(port))
    finally:
        prometheus.unregister(1)
        prometheus.unregister(2)
    assert prometheus.endpoint() is None
    with pytest.raises(OSError):
        _scrape(port)
