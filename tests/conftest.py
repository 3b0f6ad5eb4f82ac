"""Shared fixtures: one pool of rank processes for the whole session (5 workers: jobs run on 4
ranks unless they ask for more, e.g. a replacement process beside 4 original ranks), a real
3-member etcd cluster, and a real `elasticpg store-server` process."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from elasticpg.cli.launching import die_with_parent_hook

from .harness import HOST, TEST_ENV, RankPool


@pytest.fixture(scope="session")
def pool():
    pool = RankPool(5, default_world=4, env=TEST_ENV)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def etcd():
    """A 3-member etcd cluster on 127.0.0.1 (tests/etcd_cluster.py), shared by the session and
    always torn down. Tests that kill members restart them before they end."""
    pytest.importorskip("requests", reason="the etcd store needs the `etcd` extra")
    from .etcd_cluster import EtcdCluster, etcd_available

    if not etcd_available():
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server; .ci/run does)")
    cluster = EtcdCluster(3)
    yield cluster
    cluster.close()


STORE_SERVER_START = 120.0  # seconds; the server imports torch: slow on a loaded 2-core machine


@pytest.fixture
def store_server():
    """A `elasticpg store-server --port 0` process; yields its port; always stopped."""
    proc = subprocess.Popen([sys.executable, "-m", "elasticpg.cli.main", "store-server",
                             "--host", HOST, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent_hook())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + STORE_SERVER_START
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError("store-server did not start") from None
            if "listening on" in line:
                break
        yield int(line.rsplit(":", 1)[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
