"""`elasticpg run` with real processes: real SIGKILLs, real signals, real stores.

The elastic jobs run `examples/elastic_run.py` (a script written as for torchrun): a worker
SIGKILLs itself mid-run; the launcher restarts only it, as a replacement that warms up in
isolation and joins while the others keep serving. The launcher-behaviour tests (give up,
too few, Ctrl-C, launcher death) use `launcher/plain_worker.py`, which needs no torch.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from elasticpg.cli import status
from elasticpg.control.etcd_store import EtcdStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "elastic_run.py"
PLAIN = Path(__file__).resolve().parent / "launcher" / "plain_worker.py"
# a starved rank on a 2-core machine must not look hung: crashes are found by closed links
ENV = {"ELASTICPG_FAILURE_TIMEOUT": "10"}


class Launch:
    """One `python -m elasticpg.run ...` process; its merged output is read as it comes."""

    def __init__(self, *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elasticpg.run", *map(str, args)], cwd=ROOT,
            env={**os.environ, **ENV}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 90.0) -> list[re.Match]:
        """Block until `count` lines matched `pattern` (bounded)."""
        found = [m for m in map(re.compile(pattern).search, self.lines) if m]
        deadline = time.monotonic() + timeout
        while len(found) < count:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {count} x {pattern!r} within {timeout}s:\n"
                                     f"{self.text}") from None
            if line is None:
                raise AssertionError(f"launcher ended before {count} x {pattern!r}:\n"
                                     f"{self.text}")
            m = re.search(pattern, line)
            if m:
                found.append(m)
        return found

    def finish(self, timeout: float = 240.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher still running after {timeout}s:\n"
                                 f"{self.text}") from None
        self._reader.join(timeout=10)
        return rc

    def workers(self) -> list[dict]:
        """The plain workers' self-reports (pid and environment), in order of appearance."""
        return [json.loads(line.split("worker ", 1)[1]) for line in self.lines
                if "] worker {" in line]

    def close(self) -> None:
        """Also when a test failed: the launcher's death takes its workers with it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for w in self.workers():
            for pid in (w["pid"], w.get("grandchild")):
                if pid and _alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launches():
    started: list[Launch] = []

    def start(*args: object) -> Launch:
        started.append(Launch(*args))
        return started[-1]

    yield start
    for launch in started:
        launch.close()


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper we do not control)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the kernel's process table, which has no wait for others
    return [p for p in pids if _alive(p)]


def _reports(directory: Path) -> dict[tuple[int, int], dict]:
    out = {}
    for path in directory.glob("rank*.json"):
        r = json.loads(path.read_text())
        out[(r["rank"], r["restarts"])] = r
    return out


def _survivor_record(survivor: dict, start: float, end: float) -> dict:
    """How `survivor` served while the replacement lived isolated (process start to joined):
    steps completed, the longest stretch of 100 ms ticks without a completed step, the
    longest step."""
    ticks = {int(k): n for k, n in survivor["per_tick"].items()}
    first, last = int(start * 10) + 1, int(end * 10) - 1  # ticks wholly inside the window
    gap = longest = 0
    for tick in range(first, last + 1):
        gap = gap + 1 if not ticks.get(tick) else 0
        longest = max(longest, gap)
    worst = max([d for t, d in survivor["slow"] if start <= t <= end] or [0.0])
    return {"steps": sum(ticks.get(t, 0) for t in range(first, last + 1)),
            "longest_gap": longest / 10, "worst_step": worst, "window": end - start}


def _check_replaced_and_served(reports: dict, world: int, victim: int,
                               no_long_stall: bool = True) -> dict:
    """The victim's slot was refilled once and the survivors served on meanwhile (with
    `no_long_stall`: with no step, or gap between steps, of half the replacement's window)."""
    assert set(reports) == {(r, 0) for r in range(world) if r != victim} | {(victim, 1)}, \
        sorted(reports)
    rep = reports[(victim, 1)]
    assert rep["replacement"] and rep["steps"] > 0
    start, end = rep["started"], rep["joined"]
    stats = {}
    for r in range(world):
        if r == victim:
            continue
        s = reports[(r, 0)]
        assert not s["replacement"] and len(s["stalls"]) == 1, s["stalls"]  # admitted once
        rec = _survivor_record(s, start, end)
        # the survivors kept completing steps all through the replacement's import, init and
        # warm-up (seconds), and no step of theirs lasted anything like that long
        assert rec["steps"] > 0, rec
        if no_long_stall:
            assert rec["longest_gap"] < rec["window"] / 2, rec
            assert rec["worst_step"] < rec["window"] / 2, rec
        stats[r] = {**rec, "stall": s["stalls"][0]}
    def worst(v: dict) -> str:  # the example records only steps over 5 ms
        return f"{v['worst_step'] * 1e3:.1f} ms" if v["worst_step"] else "<= 5 ms"

    print(f"\nreplacement for rank {victim}: active {end - start:.2f} s after its process "
          f"started; survivors while it was isolated: " + "; ".join(
              f"rank {r}: {v['steps']} steps, worst step {worst(v)}, longest gap "
              f"{v['longest_gap']:.1f} s, admission stall {v['stall'] * 1e3:.1f} ms"
              for r, v in stats.items()))
    return stats


def test_rank0_sigkilled_is_replaced_and_joins_while_the_others_serve(launches, tmp_path):
    """Rank 0 (torchrun's store host) dies by SIGKILL mid-run: the store lives in the
    launcher, only rank 0 is restarted, its replacement joins the live group."""
    run = launches("--nproc-per-node", 3, "--restart-delay", 0.2, EXAMPLE, "--seconds", 2,
                   "--warmup", 0.3, "--kill-rank", 0, "--kill-after", 1, "--report", tmp_path)
    assert run.finish() == 0, run.text
    text = run.text
    assert "rank 0 killed by SIGKILL; restarting it as a replacement" in text, text
    assert re.search(r"\[rank 0 #1\] joined as a replacement", text), text
    assert re.search(r"\[rank [12]\] step \d+: admitted rank\(s\) \[0\]", text), text
    assert "3 ranks, 1 restart; exit 0 (all finished)" in text, text
    assert "rank 0: finished; 1 restart; exits: killed by SIGKILL, exit status 0" in text, text
    _check_replaced_and_served(_reports(tmp_path), 3, victim=0)


def test_two_nodes_one_store_server_restart_a_worker_of_the_second_node(launches, tmp_path,
                                                                         store_server):
    """Two launchers (one per "node") share a standalone `elasticpg store-server` (no launcher
    and no worker hosts the control plane); rank 3 (node 1) dies, and node 1's launcher alone
    restarts it."""
    nodes = [launches("--nnodes", 2, "--node-rank", i, "--nproc-per-node", 2, "--store",
                      f"127.0.0.1:{store_server}", "--restart-delay", 0.2, EXAMPLE, "--seconds",
                      2, "--warmup", 0.3, "--kill-rank", 3, "--kill-after", 1, "--report",
                      tmp_path) for i in (0, 1)]
    codes = [n.finish() for n in nodes]
    assert codes == [0, 0], [n.text for n in nodes]
    assert f"store 127.0.0.1:{store_server} (external)" in nodes[1].text, nodes[1].text
    assert "2 ranks, 0 restarts; exit 0 (all finished)" in nodes[0].text, nodes[0].text
    assert "rank 3 killed by SIGKILL; restarting it" in nodes[1].text, nodes[1].text
    assert "2 ranks, 1 restart; exit 0 (all finished)" in nodes[1].text, nodes[1].text
    assert re.search(r"\[rank 3 #1\] joined as a replacement", nodes[1].text), nodes[1].text
    _check_replaced_and_served(_reports(tmp_path), 4, victim=3)


def test_an_etcd_store_carries_a_run_through_a_sigkill_and_the_etcd_leaders_death(
        launches, tmp_path, etcd):
    """`--store etcd://...`: the script's plain `init_process_group("elasticpg")` rendezvouses
    on etcd; rank 1 dies by SIGKILL, and once the survivors decided that, while the launcher
    refills its slot, the etcd leader is SIGKILLed too: the group serves on, the replacement
    rendezvouses and joins through the election, the run finishes. Then the group's views are
    in etcd for `elasticpg status`, and a second run on the same prefix is refused (it would
    take the first run's views for its own).

    A store operation that meets the election can take up to the store's per-request bound
    (2 s, then the next member is tried), so a survivor's admission step may stall that long:
    the survivors must keep serving, not within the TCPStore tests' stall bound."""
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    url = etcd.url(prefix)
    # the replacement warms up for 2.5 s: longer than an election's store stall, so the
    # survivors' serving shows inside its window however the kill and the election line up
    # (with 0.3 s, a stall could cover the whole window: 0 steps, failed 1 full run in ~10)
    run = launches("--nproc-per-node", 3, "--store", url, "--restart-delay", 0.2, EXAMPLE,
                   "--seconds", 2, "--warmup", 2.5, "--kill-rank", 1, "--kill-after", 1,
                   "--report", tmp_path)
    killed = []
    try:
        run.wait_for(r"rank 1 killed by SIGKILL; restarting it")
        run.wait_for(r"\] step \d+: rank\(s\) \[1\] failed inside this all_reduce")
        killed.append(etcd.leader())
        etcd.kill(killed[0])
        rc = run.finish()
    finally:
        for i in killed:
            etcd.start(i)
    assert rc == 0, run.text
    assert f"store {url} (external)" in run.text, run.text
    assert re.search(r"\[rank 1 #1\] joined as a replacement", run.text), run.text
    assert "3 ranks, 1 restart; exit 0 (all finished)" in run.text, run.text
    _check_replaced_and_served(_reports(tmp_path), 3, victim=1, no_long_stall=False)

    store = EtcdStore(etcd.endpoints, prefix)
    try:
        (g,) = status.collect(store)
    finally:
        store.close()
    assert g["group"] == "default_pg/0/cpu" and g["epoch"] == 2, g  # failure, then the join
    assert g["active_mask"] == [1, 1, 1], g
    assert [r["incarnations"] for r in g["ranks"]] == [1, 2, 1], g

    again = launches("--store", url, "--store-timeout", 10, PLAIN, "crash", 0)
    assert again.finish(timeout=60) == 1, again.text
    assert f"the prefix {prefix!r} was used before by a launcher for node 0" in again.text
    assert "worker {" not in again.text


@pytest.mark.parametrize("min_workers", [1, 3])
def test_a_crash_looping_slot_is_given_up_after_k_restarts(launches, min_workers):
    """Rank 2 exits 3 every time. With --max-restarts 2 it runs 3 times, then the launcher
    gives up on it; the others finish (exit 3: gave up on a slot), or, when that leaves fewer
    than --min-workers, are stopped (exit 4: too few ranks left)."""
    run = launches("--nproc-per-node", 3, "--max-restarts", 2, "--restart-delay", 0.05,
                   "--min-workers", min_workers, "--grace-period", 5, PLAIN, "crash", 2)
    run.wait_for(r"giving up on rank 2")
    run.wait_for(r"\] worker \{", count=5)  # rank 2 three times, ranks 0 and 1
    if min_workers == 1:
        for w in run.workers():
            if w["RANK"] != "2":
                os.kill(w["pid"], signal.SIGUSR1)  # the healthy ones may finish now
    rc = run.finish()
    text = run.text
    assert "giving up on rank 2: exit status 3 after 2 restarts (--max-restarts 2)" in text
    assert re.findall(r"\[rank 2(?: #\d)?\] crashing on purpose", text) == [
        "[rank 2] crashing on purpose", "[rank 2 #1] crashing on purpose",
        "[rank 2 #2] crashing on purpose"], text
    twos = [w for w in run.workers() if w["RANK"] == "2"]
    assert [(w["ELASTICPG_REPLACEMENT"], w["ELASTICPG_RESTART_COUNT"]) for w in twos] == \
        [("0", "0"), ("1", "1"), ("1", "2")], twos
    for w in run.workers():  # torchrun's environment, the store the launcher's own
        assert w["WORLD_SIZE"] == "3" and w["LOCAL_WORLD_SIZE"] == "3", w
        assert w["LOCAL_RANK"] == w["RANK"] and w["GROUP_RANK"] == "0", w
        assert w["MASTER_ADDR"] == "127.0.0.1" and w["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert w["TORCHELASTIC_RESTART_COUNT"] == "0", w
    if min_workers == 1:
        assert rc == 3, text
        assert "rank 0: finished; 0 restarts; exits: exit status 0" in text, text
        assert "rank 2: given up: exit status 3 after 2 restarts" in text, text
    else:
        assert rc == 4, text
        assert "fewer than --min-workers 3: stopping the others" in text, text
        assert "rank 0: stopped: only 2 of 3 ranks left" in text, text
        assert "exits: killed by SIGTERM" in text, text


@pytest.mark.parametrize("how", ["ctrl-c", "launcher-sigkill"])
def test_stopping_the_launcher_leaves_no_process_behind(launches, how):
    """Ctrl-C: forwarded to every worker; the one that ignores it is SIGKILLed after the grace
    period, and a grandchild left in a worker's process group is killed too; exit 130.
    SIGKILL of the launcher itself: the kernel kills every worker (PR_SET_PDEATHSIG)."""
    run = launches("--nproc-per-node", 2, "--grace-period", 1, PLAIN, "linger")
    run.wait_for(r"\] worker \{", count=2)
    workers = run.workers()
    pids = [w["pid"] for w in workers]
    grandchild = next(w["grandchild"] for w in workers if w.get("grandchild"))
    t0 = time.monotonic()
    if how == "ctrl-c":
        run.proc.send_signal(signal.SIGINT)
        rc = run.finish(timeout=30)
        took = time.monotonic() - t0
        assert rc == 130, run.text
        assert "SIGINT: forwarding it to every worker; SIGKILL after 1 s" in run.text
        assert "grace period over: SIGKILL to 1 worker(s) still running" in run.text
        assert "exit 130 (interrupted by SIGINT)" in run.text, run.text
        assert "rank 1: stopped: interrupted by SIGINT; 0 restarts; exits: killed by SIGKILL" \
            in run.text, run.text
        assert _gone_within([*pids, grandchild], 10) == [], run.text
        print(f"\nCtrl-C to a clean exit (grace period 1 s): {took:.2f} s")
    else:
        run.proc.kill()
        assert run.finish(timeout=30) == -signal.SIGKILL
        assert _gone_within(pids, 10) == [], run.text
        # documented limit: a worker's own children are the worker's to end; this one was not
        os.kill(grandchild, signal.SIGKILL)


def test_an_unreachable_store_is_a_launch_error(launches):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = launches("--store", f"127.0.0.1:{port}", "--store-timeout", 1, PLAIN, "crash", 0)
    assert run.finish(timeout=60) == 1, run.text
    assert f"--store 127.0.0.1:{port} did not answer within 1 s" in run.text, run.text
    assert "worker {" not in run.text
