"""The etcd-backed store (control/etcd_store.py) against a real 3-member etcd cluster on
loopback: the c10d Store semantics, a group's collectives, failure and deferred join over it,
the leader killed while a failure is being decided, any one member killed, and a store that is
gone entirely. Members are real etcd processes, killed with SIGKILL."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import elasticpg
from elasticpg.cli import status
from elasticpg.control.etcd_store import EtcdStore, parse_url

from .harness import HOST, check_replaced, replace_a_rank

STORE_BOUND = 4.0  # init_process_group timeout in the store-gone test: every store call's bound
FAILURE_BOUND = 5.0  # that test's failure_timeout (a silent peer is declared failed after it)
OUTAGE = 6.0  # how long that test's group idles with no store at all: longer than both bounds


def _prefix() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


def _init(rank: int, url: str, timeout: float = 30.0, **opts) -> None:
    opts.setdefault("failure_timeout", 5.0)
    dist.init_process_group("elasticpg", init_method=url, rank=rank, world_size=4,
                            timeout=timedelta(seconds=timeout),
                            pg_options=elasticpg.Options(**opts))


def _sum(x: float, group=None) -> float:
    t = torch.tensor([x])
    dist.all_reduce(t, group=group)
    return t.item()


def _tcp(port: int) -> dist.Store:
    """The job's TCPStore (hosted by the test): coordination that must not depend on etcd."""
    return dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))


# ---- the Store API, in this process --------------------------------------------------------

def test_store_semantics(etcd):
    s = EtcdStore(etcd.endpoints, _prefix(), timeout=timedelta(seconds=10))
    other = EtcdStore(etcd.endpoints, _prefix(), timeout=timedelta(seconds=10))
    s.set("a", "1")
    assert s.get("a") == b"1" and not other.check(["a"])  # prefixes never mix
    assert s.add("n", 2) == 2 and s.add("n", -5) == -3 and s.get("n") == b"-3"
    assert s.compare_set("c", "", "x") == b"x"  # missing + "" expected: swapped
    assert s.compare_set("c", "y", "z") == b"x"  # mismatch: the current value
    assert s.compare_set("c", "x", "z") == b"z"
    assert s.compare_set("nope", "q", "r") == b"q"  # missing + a value expected: TCPStore's
    assert not s.check(["nope"])
    assert s.check(["a", "n", "c"]) and not s.check(["a", "zz"])
    assert s.num_keys() == 3 and sorted(s.keys()) == ["a", "c", "n"]
    assert s.delete_key("a") and not s.delete_key("a") and s.num_keys() == 2
    s.set("bin", bytes(range(256)))
    assert s.get("bin") == bytes(range(256))

    # through torch's PrefixStore (how every process group sees it)
    p = dist.PrefixStore("g", s)
    p.set("k", "v")
    assert s.get("g/k") == b"v" and p.add("cnt", 4) == 4 and p.delete_key("k")

    # wait: woken by a write from another client; bounded otherwise
    threading.Timer(0.2, lambda: other.set("late", "1")).start()
    t0 = time.monotonic()
    other.wait(["late"], timedelta(seconds=10))
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="did not appear"):
        s.wait(["never"], timedelta(seconds=0.5))
    assert time.monotonic() - t0 < 0.5 + 3


def test_concurrent_adds_and_swaps_are_exact(etcd):
    """Exactly once and exactly one winner, with 8 clients racing on all three members."""
    prefix = _prefix()
    stores = [EtcdStore(etcd.endpoints[i % 3:] + etcd.endpoints[:i % 3], prefix)
              for i in range(8)]
    won: list[bytes] = []

    def client(i: int) -> None:
        for _ in range(10):
            stores[i].add("counter", 1)
        won.append(stores[i].compare_set("decision", "", f"proposal-{i}"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert stores[0].get("counter") == b"80"
    assert len(won) == 8 and len(set(won)) == 1, won  # one decision, seen by everyone
    assert stores[0].keys() == ["counter", "decision"]  # add's markers are gone


def test_a_wait_survives_the_death_of_the_member_it_watches(etcd):
    prefix = _prefix()
    waiter = EtcdStore(etcd.endpoints, prefix, timeout=timedelta(seconds=20))  # watches m0
    writer = EtcdStore(etcd.endpoints[1:], prefix)
    done: list[float] = []
    t = threading.Thread(target=lambda: (waiter.wait(["k"]), done.append(time.monotonic())),
                         daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while etcd.watchers(0) < 1:  # the waiter's watch is open on member 0
            assert time.monotonic() < deadline, "the wait never opened a watch"
            time.sleep(0.01)
        etcd.kill(0)
        writer.set("k", "1")
        written = time.monotonic()
        t.join(20)
    finally:
        etcd.start(0)
    assert done and done[0] - written < 10, "the wait did not see the write"


def test_unreachable_store_fails_within_its_bound():
    """No member is there: every operation raises DistNetworkError once its bound is spent."""
    from .etcd_cluster import _free_ports

    dead = [f"{HOST}:{p}" for p in _free_ports(3)]
    s = EtcdStore(dead, "gone", timeout=timedelta(seconds=0.5))
    for op in (lambda: s.set("a", "1"), lambda: s.get("a"), lambda: s.add("a", 1),
               lambda: s.compare_set("a", "", "1"), lambda: s.check(["a"]),
               lambda: s.wait(["a"], timedelta(seconds=0.5))):
        t0 = time.monotonic()
        with pytest.raises(dist.DistNetworkError, match="no member answered"):
            op()
        assert time.monotonic() - t0 < 0.5 + 3


def test_bad_urls_are_clear_errors():
    with pytest.raises(ValueError, match="no key prefix"):
        parse_url("etcd://127.0.0.1:2379")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_url("etcd://127.0.0.1:2379,nonsense/job")
    with pytest.raises(ValueError, match="rank and world_size"):
        next(elasticpg.control.etcd_store.rendezvous_handler("etcd://127.0.0.1:1/job"))


# ---- a group over etcd -----------------------------------------------------------------------

def job_fail_and_join(rank: int, world: int, port: int, url: str) -> dict:
    """Collectives; rank 1 dies; the survivors go on; a replacement joins slot 1 (all through
    the etcd:// init_method; the test's signals go through its TCPStore)."""
    return replace_a_rank(rank, 1, lambda r, ext: _init(r, url, is_extension=ext), _tcp(port))


def test_collectives_failure_and_deferred_join_over_etcd(pool, etcd, capsys):
    url = etcd.url(_prefix())
    check_replaced(pool.run_raw(job_fail_and_join, url, world=5, timeout=120), victim=1)

    # elasticpg status reads the same decisions from etcd
    assert status.main([url, "--json"]) == 0
    (g,) = json.loads(capsys.readouterr().out)
    assert g["group"] == "default_pg/0/cpu" and g["epoch"] == 2, g
    assert g["active_mask"] == [1, 1, 1, 1] and not g["joiners_waiting"], g
    assert [r["incarnations"] for r in g["ranks"]] == [1, 2, 1, 1], g
    assert g["ranks"][1]["joins"][-1]["activated_in"] == 2, g


def job_decide_during_election(rank: int, world: int, port: int, url: str) -> dict:
    """Rank 3 dies the moment the test says go; the test kills the etcd leader right then."""
    tcp = _tcp(port)
    _init(rank, url)
    _sum(1.0)
    if rank == 3:
        tcp.set("ready3", "1")
        tcp.wait(["go"], timedelta(seconds=30))
        os._exit(0)
    t0 = time.monotonic()
    total = _sum(float(rank))  # the failure is detected and decided in here
    took = time.monotonic() - t0
    return {"sum": total, "epoch": elasticpg.get_current_epoch(), "took": took,
            "mask": elasticpg.get_active_ranks().tolist(), "again": _sum(1.0)}


def test_leader_killed_while_a_failure_is_decided(pool, etcd):
    prefix = _prefix()
    url = etcd.url(prefix)
    from elasticpg.cli.launching import listen_store

    tcp, port = listen_store(5, 60)
    killed: list[int] = []

    def chaos() -> None:
        tcp.wait(["ready3"], timedelta(seconds=60))
        leader = etcd.leader()
        tcp.set("go", "1")  # rank 3 exits now: the survivors decide while etcd elects
        etcd.kill(leader)
        killed.append(leader)

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    try:
        res = pool.run_raw(job_decide_during_election, url, timeout=90, port=port)
    finally:
        t.join(60)
        for i in killed:
            etcd.start(i)
    assert killed, "the leader was never killed"
    assert res[3].status == "dead"
    views = [res[r].value for r in (0, 1, 2)]
    assert all(res[r].status == "ok" for r in (0, 1, 2)), res
    for v in views:  # exactly one agreed view at every survivor
        assert (v["sum"], v["epoch"], v["mask"], v["again"]) == (3.0, 1, [1, 1, 1, 0], 3.0), v
    store = EtcdStore(etcd.endpoints, prefix)
    decided = sorted(k for k in store.keys() if "/view/" in k)
    assert [k.rsplit("/", 1)[1] for k in decided] == ["1", "latest"], decided


def job_member_kills(rank: int, world: int, port: int, url: str, members: int) -> list:
    """One phase per etcd member: it is dead while the group makes a subgroup (secret, counters,
    endpoints: every store operation) and runs collectives on both."""
    tcp = _tcp(port)
    endpoints, prefix = parse_url(url)
    store = EtcdStore(endpoints, prefix, timeout=timedelta(seconds=30))  # store=, not a URL
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=4,
                            timeout=timedelta(seconds=30),
                            pg_options=elasticpg.Options(failure_timeout=5.0))
    out = []
    for i in range(members):
        tcp.wait([f"killed{i}"], timedelta(seconds=60))
        sub = dist.new_group([0, 1, 2, 3], backend="elasticpg")
        out.append((_sum(float(rank)), _sum(1.0, sub)))
        tcp.set(f"done{i}/{rank}", "1")
    return out


def test_any_one_member_killed_never_stops_the_group(pool, etcd):
    from elasticpg.cli.launching import listen_store

    tcp, port = listen_store(5, 60)
    errors: list[BaseException] = []

    def chaos() -> None:
        try:
            for i in range(etcd.size):
                etcd.kill(i)
                tcp.set(f"killed{i}", "1")
                tcp.wait([f"done{i}/{r}" for r in range(4)], timedelta(seconds=60))
                etcd.start(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    try:
        prefix = _prefix()
        res = pool.run_raw(job_member_kills, etcd.url(prefix), etcd.size, timeout=90,
                           port=port)
    finally:
        t.join(60)
        for i in range(etcd.size):
            etcd.start(i)
    assert not errors, errors
    assert [(x.status, x.value) for x in res] == [("ok", [(6.0, 4.0)] * etcd.size)] * 4, res
    # every group is in the status: the default one and one subgroup per phase
    groups = status.collect(EtcdStore(etcd.endpoints, prefix))
    assert len(groups) == 1 + etcd.size, [g["group"] for g in groups]
    assert all(g["epoch"] == 0 and g["active_mask"] == [1] * 4 for g in groups), groups


def job_store_gone(rank: int, world: int, port: int, url: str) -> dict:
    """The whole store vanishes. For longer than the failure bound and the store's bound, the
    group idles, then runs a collective: a store outage is no rank's failure (the liveness
    polls give up within a tick, so heartbeats go on). Then rank 3 dies: the survivors' next
    collective needs a decision and must fail clearly within the store's bound."""
    tcp = _tcp(port)
    _init(rank, url, timeout=STORE_BOUND, failure_timeout=FAILURE_BOUND)
    first = _sum(1.0)
    tcp.set(f"formed{rank}", "1")
    tcp.wait(["etcd-gone"], timedelta(seconds=60))
    busy = _sum(1.0)
    tcp.wait(["outage-over"], timedelta(seconds=60))  # idle: only heartbeats flow
    outage = {"sums": [busy, _sum(1.0)], "mask": elasticpg.get_active_ranks().tolist(),
              "epoch": elasticpg.get_current_epoch()}
    if rank == 3:
        os._exit(0)
    t0 = time.monotonic()
    try:
        _sum(1.0)
        err = "none"
    except Exception as exc:  # noqa: BLE001 - the error is what is reported
        err = f"{type(exc).__name__}: {exc}"
    return {"first": first, "outage": outage, "error": err, "took": time.monotonic() - t0}


def test_store_gone_entirely_is_a_clear_error_within_the_bound(pool):
    from elasticpg.cli.launching import listen_store

    from .etcd_cluster import EtcdCluster, etcd_available

    if not etcd_available():
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    single = EtcdCluster(1)
    tcp, port = listen_store(5, 60)
    # the store's bound is init_process_group's timeout (the etcd:// handler sets it)
    try:
        def chaos() -> None:
            tcp.wait([f"formed{r}" for r in range(4)], timedelta(seconds=60))
            single.kill(0)
            tcp.set("etcd-gone", "1")
            threading.Event().wait(OUTAGE)  # the outage's length, while the group idles
            tcp.set("outage-over", "1")

        t = threading.Thread(target=chaos, daemon=True)
        t.start()
        res = pool.run_raw(job_store_gone, single.url(_prefix()), timeout=90, port=port,
                           victim=3)
        t.join(10)
    finally:
        single.close()
    for r in (0, 1, 2):
        assert res[r].status == "ok", res[r].value
        v = res[r].value
        assert v["first"] == 4.0
        assert v["outage"] == {"sums": [4.0, 4.0], "mask": [1, 1, 1, 1], "epoch": 0}, v
        assert v["error"].startswith("ControlPlaneError") and "decide a view" in v["error"], v
        assert "no member answered" in v["error"], v
        assert v["took"] < STORE_BOUND + 10, v


def test_torchrun_workers_rendezvous_on_etcd_through_the_environment(etcd):
    """ELASTICPG_INIT_METHOD=etcd://... makes env:// (a torchrun script's plain
    `init_process_group("elasticpg")`) use etcd, not torchrun's TCPStore; the group's keys
    are in etcd afterwards."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    prefix = _prefix()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(root / "examples" / "quickstart.py")], capture_output=True, text=True,
        timeout=240, cwd=root, env={**os.environ, "ELASTICPG_INIT_METHOD": etcd.url(prefix)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(proc.stdout.count(f"rank {r}: all_reduce=1 ") for r in (0, 1)) == [1, 1], \
        proc.stdout
    store = EtcdStore(etcd.endpoints, prefix)
    try:
        (g,) = status.collect(store)
    finally:
        store.close()
    assert g["group"] == "default_pg/0/cpu" and g["founders"] == 2, g


# ---- the test cluster itself: nothing outlives the test process ------------------------------

def _running(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper we do not control)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _until(cond, bound: float) -> bool:
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling the kernel's process table, which has no wait for others
    return True


def test_a_member_restarted_from_a_short_lived_thread_outlives_that_thread():
    """Members die with the test process (PR_SET_PDEATHSIG), which Linux ties to the thread
    that forked them: a restart from a chaos thread must not die when that thread ends."""
    from .etcd_cluster import EtcdCluster, etcd_available

    if not etcd_available():
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    single = EtcdCluster(1)
    try:
        single.kill(0)
        t = threading.Thread(target=single.start, args=(0,))
        t.start()
        t.join(60)
        assert not t.is_alive()
        # the OS thread is gone (not only its Python half): a parent-death signal is sent now
        assert _until(lambda: not os.path.exists(f"/proc/self/task/{t.native_id}"), 10)
        single.wait_healthy()
        assert single.alive() == [0]
    finally:
        single.close()


def test_a_sigkilled_test_process_leaves_no_etcd_behind():
    import select
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from .etcd_cluster import etcd_available

    if not etcd_available():
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    code = ("import sys; from tests.etcd_cluster import EtcdCluster; c = EtcdCluster(1); "
            "print(c.procs[0].pid, c.dir, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid, where = None, None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        assert ready, "the cluster did not start"
        pid, where = proc.stdout.readline().split()
        pid = int(pid)
        assert _running(pid)
        proc.kill()
        proc.wait(10)
        assert _until(lambda: not _running(pid), 10), f"etcd {pid} outlived its test process"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)
        if where:
            shutil.rmtree(where, ignore_errors=True)
