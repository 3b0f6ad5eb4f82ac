"""A real etcd cluster on 127.0.0.1 for the tests (Debian's `etcd-server` package, `etcd` on
PATH): members on free ports in a temporary directory, each killable and restartable, all
torn down (SIGKILL, by PID) when the cluster is closed, and killed by the kernel if the test
process dies first (even by SIGKILL: PR_SET_PDEATHSIG, see `_Spawner`)."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from elasticpg.cli.launching import die_with_parent_hook

HOST = "127.0.0.1"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT = 30.0


def etcd_available() -> bool:
    return os.access(ETCD, os.X_OK)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _Spawner:
    """Starts every member of a cluster from one thread that lives as long as the cluster.

    Members get PR_SET_PDEATHSIG (SIGKILL), so a test run that is SIGKILLed leaks no etcd. But
    Linux sends that signal when the *thread* that forked the child exits, not its process: a
    member restarted from a short-lived thread (a test's chaos thread) would be killed the
    moment that thread ends. Forking only here ties every member to the cluster's lifetime.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], threading.Event, list] | None] = \
            queue.Queue()
        self._thread = threading.Thread(target=self._run, name="etcd-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, done, out = job
            try:
                out.append(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                out.append(exc)
            done.set()

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        done, out = threading.Event(), []
        hook = die_with_parent_hook()
        self._jobs.put((lambda: subprocess.Popen(args, preexec_fn=hook, **kwargs), done, out))
        if not done.wait(START_TIMEOUT):
            raise TimeoutError(f"could not start {args[0]} within {START_TIMEOUT} s")
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def close(self) -> None:
        """Only once every member is dead: the thread's exit would kill the rest."""
        self._jobs.put(None)
        self._thread.join(10)


class EtcdCluster:
    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.dir = tempfile.mkdtemp(prefix="elasticpg-etcd-")
        ports = _free_ports(2 * size)
        self.client_ports, self.peer_ports = ports[:size], ports[size:]
        self.names = [f"m{i}" for i in range(size)]
        self.initial = ",".join(f"{n}=http://{HOST}:{p}"
                                for n, p in zip(self.names, self.peer_ports, strict=True))
        self.procs: list[subprocess.Popen | None] = [None] * size
        self._logs: list = [None] * size
        self._spawner = _Spawner()
        try:
            for i in range(size):
                self.start(i, wait=False)
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.client_ports]

    def url(self, prefix: str) -> str:
        return "etcd://" + ",".join(self.endpoints) + "/" + prefix

    def start(self, i: int, wait: bool = True) -> None:
        if self.procs[i] is not None and self.procs[i].poll() is None:
            return
        c, p = self.client_ports[i], self.peer_ports[i]
        log = open(os.path.join(self.dir, f"{self.names[i]}.log"), "ab")  # noqa: SIM115
        self._logs[i] = log
        self.procs[i] = self._spawner.popen(
            [ETCD, "--name", self.names[i], "--data-dir", os.path.join(self.dir, self.names[i]),
             "--listen-client-urls", f"http://{HOST}:{c}",
             "--advertise-client-urls", f"http://{HOST}:{c}",
             "--listen-peer-urls", f"http://{HOST}:{p}",
             "--initial-advertise-peer-urls", f"http://{HOST}:{p}",
             "--initial-cluster", self.initial, "--initial-cluster-state", "new",
             "--initial-cluster-token", os.path.basename(self.dir),
             # fast elections: a killed leader is replaced in well under a second
             "--heartbeat-interval", "50", "--election-timeout", "400",
             "--logger", "zap", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_healthy()

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def status(self, i: int) -> dict:
        r = requests.post(f"http://{self.endpoints[i]}/v3/maintenance/status", json={},
                          timeout=1.0)
        r.raise_for_status()
        return r.json()

    def leader(self, timeout: float = START_TIMEOUT) -> int:
        """Index of the current leader (as the live members report it)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in self.alive():
                try:
                    st = self.status(i)
                except requests.RequestException:
                    continue
                if st.get("leader") and st["leader"] == st["header"]["member_id"]:
                    return i
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd cluster in {self.dir} has no leader")
            time.sleep(0.05)

    def watchers(self, i: int) -> int:
        """How many watches member i serves now (its metrics)."""
        text = requests.get(f"http://{self.endpoints[i]}/metrics", timeout=1.0).text
        for line in text.splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
        raise RuntimeError(f"etcd member {i} reports no watcher count")

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Every live member answers a linearizable read (so it has a leader)."""
        deadline = time.monotonic() + timeout
        for i in self.alive():
            while True:
                try:
                    r = requests.post(f"http://{self.endpoints[i]}/v3/kv/range",
                                      json={"key": "aGVhbHRo"}, timeout=1.0)
                    if r.status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if self.procs[i].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {i} did not become healthy; log: "
                                       f"{self.log_tail(i)}")
                time.sleep(0.05)

    def log_tail(self, i: int) -> str:
        try:
            with open(os.path.join(self.dir, f"{self.names[i]}.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError as exc:
            return str(exc)

    def close(self) -> None:
        for i in range(self.size):
            self.kill(i)
            if self._logs[i] is not None:
                self._logs[i].close()
        self._spawner.close()
        shutil.rmtree(self.dir, ignore_errors=True)
