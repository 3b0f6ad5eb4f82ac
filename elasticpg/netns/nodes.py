"""Rank processes on the hosts of a Topology, started with `ip netns exec`, running jobs.

Like cli/rank_pool.RankPool (which spawns on this host), a node imports torch once and then
runs one job after another, so a test module pays the start-up once per node. Jobs and results
travel as pickles over two pipes the node inherits (pipes are not network: they cross
namespaces). A job is `fn(rank, world, port, *args)` as in RankPool: `port` is a fresh TCPStore
that this process hosts for the job inside the switch namespace, at `STORE_HOST_ENV` (an
environment variable every node has). Every wait is bounded: a node
that does not answer in time is SIGKILLed (by pid) and reported, and `close` ends them all.
Nodes die with their parent (PR_SET_PDEATHSIG survives `ip netns exec`, which is no set-uid
binary).
"""

from __future__ import annotations

import itertools
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..cli.launching import die_with_parent_hook
from ..cli.rank_pool import RankResult
from .topology import SWITCH_ADDR, Topology, in_namespace

_LEN = struct.Struct("<Q")
STORE_HOST_ENV = "ELASTICPG_NETNS_STORE"  # where a node's jobs find their store
FIRST_PORT = 29400  # the switch namespace is this run's own: any port is free there
START_TIMEOUT = 120.0  # importing torch on a loaded 2-core machine


class NodeError(RuntimeError):
    """A node did not start, or did not answer within its bound."""


def write_msg(fd: int, obj: object) -> None:
    data = pickle.dumps(obj)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_msg(fd: int) -> object | None:
    """One message, None at EOF (the node died)."""
    head = read_exact(fd, _LEN.size)
    if head is None:
        return None
    body = read_exact(fd, _LEN.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def job_store(topo: Topology, port: int, world: int, timeout: float = 60.0) -> Any:
    """A TCPStore master for one job, listening at the switch's address (so every host reaches
    it over its link; a host whose link is down loses the store too, as a real one would)."""
    from datetime import timedelta

    import torch.distributed as dist

    return in_namespace(topo.switch, lambda: dist.TCPStore(
        SWITCH_ADDR, port, world, True, timedelta(seconds=timeout), wait_for_workers=False))


@dataclass
class Node:
    host: int
    proc: subprocess.Popen
    jobs_w: int
    results_r: int
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid  # `ip netns exec` execs the interpreter: the same pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it just exited
        self.proc.wait(10)

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError as exc:
            return f"(no log: {exc})"

    def close_pipes(self) -> None:
        for fd in (self.jobs_w, self.results_r):
            try:
                os.close(fd)
            except OSError:
                pass  # closed already


class NodePool:
    """Nodes on `placement[i]` = the host index of node i. The parent holds the store."""

    def __init__(self, topo: Topology, placement: Sequence[int],
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 output: int | None = None) -> None:
        """`output`: a file descriptor for the nodes' stdout and stderr (default: a log file
        per node, whose tail goes into error messages)."""
        self.topo = topo
        self.placement = list(placement)
        self._stores: dict[int, Any] = {}  # job -> its store, until collected
        self._env = dict(env or {})
        self._cwd = cwd or os.getcwd()
        self._output = output
        self._logs = tempfile.mkdtemp(prefix=f"{topo.prefix}-logs-")
        self._jobs = itertools.count(1)
        self.nodes: list[Node | None] = [None] * len(self.placement)
        try:
            self._start(range(len(self.placement)))
        except BaseException:
            self.close()
            raise

    def _launch(self, i: int) -> Node:
        host = self.placement[i]
        jobs_r, jobs_w = os.pipe()
        results_r, results_w = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ELASTICPG_HOST": self.topo.addr(host),
               "GLOO_SOCKET_IFNAME": "eth0", STORE_HOST_ENV: SWITCH_ADDR,
               "PYTHONPATH": self._cwd, **self._env}
        log_path = os.path.join(self._logs, f"node{i}.log")
        with open(log_path, "ab") as log:
            out = log.fileno() if self._output is None else self._output
            proc = subprocess.Popen(
                [*self.topo.exec_prefix(host), sys.executable, "-m", "elasticpg.netns.node",
                 str(jobs_r), str(results_w)],
                pass_fds=(jobs_r, results_w), env=env, cwd=self._cwd, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent_hook())
        os.close(jobs_r)
        os.close(results_w)
        return Node(host, proc, jobs_w, results_r, log_path)

    def _start(self, which: Sequence[int] | range) -> None:
        for i in which:
            self.nodes[i] = self._launch(i)
        deadline = time.monotonic() + START_TIMEOUT
        for i in which:
            node = self.nodes[i]
            if not _readable(node.results_r, deadline - time.monotonic()):
                raise NodeError(f"node {i} did not start within {START_TIMEOUT:.0f}s:\n"
                                f"{node.log_tail()}")
            msg = read_msg(node.results_r)
            if msg != ("ready", node.pid):
                raise NodeError(f"node {i} failed to start ({msg!r}):\n{node.log_tail()}")

    def revive(self) -> list[int]:
        """Replace dead nodes (blocking until they are ready); returns their indices."""
        dead = [i for i, n in enumerate(self.nodes) if n is None or not n.alive()]
        for i in dead:
            if self.nodes[i] is not None:
                self.nodes[i].proc.wait(10)
                self.nodes[i].close_pipes()
        if dead:
            self._start(dead)
        return dead

    def store(self, job: int) -> Any:
        """The parent's client of job `job`'s store (to watch or steer the job)."""
        return self._stores[job]

    def submit(self, fn: Callable, *args: Any, nodes: Sequence[int], world: int | None = None,
               ranks: Sequence[int] | None = None) -> int:
        """Start fn on `nodes` (rank ranks[k] on nodes[k]; default 0..); returns the job id
        for `collect`."""
        self.revive()
        job = next(self._jobs)
        ranks = list(range(len(nodes))) if ranks is None else list(ranks)
        world = len(nodes) if world is None else world
        port = FIRST_PORT + job  # a new port per job: no TIME_WAIT of the last one in the way
        self._stores[job] = job_store(self.topo, port, world)
        for k, i in enumerate(nodes):
            write_msg(self.nodes[i].jobs_w, (job, fn, ranks[k], world, port, args))
        return job

    def collect(self, job: int, nodes: Sequence[int], timeout: float,
                victims: Sequence[int] = (), grace: float = 5.0) -> dict[int, RankResult]:
        """Results of `job` per node. A victim (meant to die or be cut off) still running
        `grace` s after every other node finished is SIGKILLed and reported "left alive"; a
        node that passes `timeout` fails the call (and is killed)."""
        try:
            return self._collect(job, nodes, timeout, victims, grace)
        finally:
            self._stores.pop(job, None)

    def _collect(self, job: int, nodes: Sequence[int], timeout: float, victims: Sequence[int],
                 grace: float) -> dict[int, RankResult]:
        results: dict[int, RankResult] = {}
        deadline = time.monotonic() + timeout
        victims_deadline: float | None = None
        while len(results) < len(nodes):
            pending = [i for i in nodes if i not in results]
            if victims_deadline is None and all(i in victims for i in pending):
                victims_deadline = time.monotonic() + grace
            end = min(deadline, victims_deadline or deadline)
            fds = {self.nodes[i].results_r: i for i in pending}
            ready, _, _ = select.select(list(fds), [], [], max(0.0, min(end - time.monotonic(),
                                                                        0.2)))
            for fd in ready:
                i = fds[fd]
                msg = read_msg(fd)
                if msg is None:
                    self.nodes[i].proc.wait(10)
                    results[i] = RankResult("dead", self.nodes[i].proc.returncode)
                elif msg[0] == job:
                    results[i] = RankResult(msg[1], msg[2])
            now = time.monotonic()
            if victims_deadline is not None and now > victims_deadline:
                for i in pending:
                    if i not in results:
                        self.nodes[i].kill()
                        results[i] = RankResult("left alive", "SIGKILLed by the pool")
            elif now > deadline:
                late = [i for i in pending if i not in results]
                logs = "\n".join(f"--- node {i}:\n{self.nodes[i].log_tail()}" for i in late)
                for i in late:
                    self.nodes[i].kill()
                raise NodeError(f"nodes {late} did not finish job {job} within {timeout:.0f}s;"
                                f" partial results: {results}\n{logs}")
        return results

    def run(self, fn: Callable, *args: Any, nodes: Sequence[int], timeout: float = 60.0,
            **kw: Any) -> list[Any]:
        """Run fn on `nodes` and return their values in order; any error fails the call."""
        job = self.submit(fn, *args, nodes=nodes, **kw)
        res = self.collect(job, nodes, timeout)
        bad = {i: r for i, r in res.items() if r.status != "ok"}
        if bad:
            msg = "\n".join(f"--- node {i}: {r.status}\n{r.value}\n{self.nodes[i].log_tail()}"
                            for i, r in bad.items())
            raise AssertionError(f"{fn.__name__} failed on nodes {sorted(bad)}:\n{msg}")
        return [res[i].value for i in nodes]

    def kill(self, nodes: Sequence[int]) -> None:
        """SIGKILL these nodes, all signals sent before any is waited for."""
        for i in nodes:
            try:
                os.kill(self.nodes[i].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it is gone already
        for i in nodes:
            self.nodes[i].proc.wait(10)

    def close(self) -> None:
        for n in self.nodes:
            if n is not None:
                n.close_pipes()  # an idle node sees EOF on its job pipe and exits
        deadline = time.monotonic() + 5
        for n in self.nodes:
            if n is not None:
                try:
                    n.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    n.kill()
        self.nodes = [None] * len(self.placement)
        shutil.rmtree(self._logs, ignore_errors=True)


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], max(0.0, timeout))[0])


def run_once(topo: Topology, placement: Sequence[int], fn: Callable, *args: Any,
             timeout: float, prog: str) -> Any | None:
    """Build `topo`, run one job on a node per entry of `placement` (its host), tear it all
    down: the benchmarks' whole life in namespaces. Returns the job's results, or None after
    saying on stderr which rank failed and why (or which namespaces outlived the run)."""
    pool = None
    try:
        topo.create()
        pool = NodePool(topo, placement, output=sys.stdout.fileno())
        return pool.run(fn, *args, nodes=list(range(len(placement))), timeout=timeout)
    except AssertionError as exc:  # a rank failed: NodePool.run says which and why
        print(f"{prog}: FAILED:\n{exc}", file=sys.stderr, flush=True)
        return None
    finally:
        if pool is not None:
            pool.close()
        left = topo.remove()
        if left:
            print(f"{prog}: could not remove namespaces: {left}", file=sys.stderr)
