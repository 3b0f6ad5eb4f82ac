"""`elasticpg run`'s command line and store addresses, in-process."""

from __future__ import annotations

import socket
import sys

import pytest

from elasticpg.launcher.config import parse_args
from elasticpg.launcher.store import LaunchError, StoreSpec, parse_store, store_for_workers

SCRIPT = __file__  # any existing file will do as "the script"


def test_defaults_and_torchrun_spellings():
    c = parse_args(["--nproc_per_node", "4", SCRIPT, "--lr", "0.1", "-m", "x"])
    assert (c.nproc_per_node, c.nnodes, c.node_rank, c.store, c.min_workers) == (4, 1, 0,
                                                                                 None, 1)
    assert (c.policy.max_restarts, c.policy.delay, c.policy.max_delay) == (3, 1.0, 30.0)
    # everything after the script is the script's, even options the launcher also has
    assert c.command == (sys.executable, SCRIPT, "--lr", "0.1", "-m", "x")
    assert [s.rank for s in c.slots()] == [0, 1, 2, 3]
    assert parse_args(["--standalone", SCRIPT]).store is None
    assert len(parse_args([SCRIPT]).run_id) == 12


def test_nodes_modules_and_executables():
    c = parse_args(["--nnodes", "3", "--node-rank", "2", "--nproc-per-node", "2", "--store",
                    "10.1.2.3:29500", "-m", "pkg.train", "a"])
    assert [s.rank for s in c.slots()] == [4, 5] and c.slots()[0].world_size == 6
    assert c.store == StoreSpec("tcp", (("10.1.2.3", 29500),))
    assert c.command == (sys.executable, "-m", "pkg.train", "a")
    c = parse_args(["--no-python", "--max-restarts", "0", "--restart-delay", "0.5",
                    "/bin/true", "x"])
    assert c.command == ("/bin/true", "x") and c.policy.max_restarts == 0
    assert c.policy.delay == 0.5


@pytest.mark.parametrize("argv, message", [
    (["--node-rank", "2", "--nnodes", "2", "--store", "h:1", SCRIPT], "outside 0..1"),
    (["--nnodes", "2", SCRIPT], "needs --store"),
    (["--nproc-per-node", "2", "--min-workers", "3", SCRIPT], "more than this node's"),
    (["--nproc-per-node", "0", SCRIPT], "must be at least 1"),
    (["--max-restarts", "-1", SCRIPT], "must be 0 or more"),
    (["--restart-delay", "soon", SCRIPT], "expected seconds"),
    (["--grace-period", "0", SCRIPT], "more than 0 seconds"),
    (["--store", "nohost", SCRIPT], "expected HOST:PORT"),
    (["--store", "h:1", "--standalone", SCRIPT], "not allowed with"),
    (["--nnodes", "2", "--store", "etcd://h:1", SCRIPT], "a key prefix every node"),
    (["/no/such/script.py"], "not found"),
    ([], "required"),
])
def test_bad_command_lines_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, spec", [
    ("127.0.0.1:29500", StoreSpec("tcp", (("127.0.0.1", 29500),))),
    ("tcp://node0:1234", StoreSpec("tcp", (("node0", 1234),))),
    ("[::1]:29500", StoreSpec("tcp", (("::1", 29500),))),
    ("etcd://a:2379,b:2379", StoreSpec("etcd", (("a", 2379), ("b", 2379)))),
    ("etcd://a:2379/jobs/42/", StoreSpec("etcd", (("a", 2379),), "jobs/42")),
])
def test_store_addresses(text, spec):
    assert parse_store(text) == spec


@pytest.mark.parametrize("text, message", [
    ("h:0", "port in 1..65535"), ("h:99999", "port in 1..65535"), (":80", "HOST:PORT"),
    ("redis://h:1", "unknown store scheme"), ("tcp://a:1,b:2", "one address"),
    ("tcp://h:1/x", "no path"), ("etcd://", "no HOST:PORT"), ("etcd://h:1/p?x=1", "no query"),
])
def test_bad_store_addresses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_store(text)


def test_an_etcd_store_gets_a_prefix_per_run_and_workers_get_its_url():
    c = parse_args(["--store", "etcd://a:1,b:2", "--run-id", "r7", SCRIPT])
    assert c.store == StoreSpec("etcd", (("a", 1), ("b", 2)), "elasticpg-r7")
    assert str(c.store) == "etcd://a:1,b:2/elasticpg-r7"
    c = parse_args(["--nnodes", "2", "--store", "etcd://a:1/job", SCRIPT])  # shared prefix
    assert c.store.prefix == "job"


def test_an_unreachable_etcd_store_is_a_launch_error_within_the_bound():
    pytest.importorskip("requests", reason="the etcd store needs the `etcd` extra")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(LaunchError, match="did not answer within 1 s"):
        with store_for_workers(parse_store(f"etcd://{dead}/job"), 2, 1.0):
            pass
