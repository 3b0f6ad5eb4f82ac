"""`elasticpg store-server` (a real server process) carries a group through the death of rank 0
and a replacement's join; `elasticpg status` reads that live group's view from it (and from
etcd) at each step."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import torch.distributed as dist

import elasticpg
from elasticpg.cli import status

from .harness import HOST, check_replaced, replace_a_rank


def _init(rank: int, port: int, is_extension: bool) -> None:
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=4,
                            timeout=timedelta(seconds=30),
                            pg_options=elasticpg.Options(failure_timeout=5.0,
                                                         is_extension=is_extension))


def job_rank0_replaced(rank: int, world: int, port: int) -> dict:
    """Rank 0 dies; the survivors go on; the replacement's join waits until the test has read
    the status, then it is admitted into slot 0."""
    coord = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
    return replace_a_rank(rank, 0, lambda r, ext: _init(r, port, ext), coord,
                          hold="status-read")


def _default_group(store) -> dict:
    groups = status.collect(store)
    assert len(groups) == 1, groups
    return groups[0]


def test_rank0_dies_and_is_replaced_with_a_store_server(pool, store_server, capsys):
    port = store_server
    client = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
    seen: dict = {}

    def watch_status() -> None:
        """While the join waits: the status shows it, and the failure's view."""
        try:
            client.wait([f"excluded{r}" for r in (1, 2, 3)], timedelta(seconds=60))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                g = _default_group(client)
                if g["joiners_waiting"]:
                    seen["joining"] = g
                    break
                time.sleep(0.05)  # polling an operator's view, as --watch does
        finally:
            client.set("status-read", "1")  # never leave the members waiting

    t = threading.Thread(target=watch_status, daemon=True)
    t.start()
    res = pool.run_raw(job_rank0_replaced, world=5, timeout=120, port=port)
    t.join(30)
    check_replaced(res, victim=0)

    g = seen.get("joining")
    assert g is not None, "the status never showed the waiting joiner"
    assert "2.1 waiting" in status.render([g], "the store-server")
    assert g["epoch"] == 1 and g["active_mask"] == [0, 1, 1, 1], g
    assert g["joiners_waiting"] == [0] and g["ranks"][0]["state"] == "joining", g
    assert g["last_decision"]["cause"], g  # why rank 0 was excluded
    assert [r["state"] for r in g["ranks"][1:]] == ["active"] * 3, g

    # after the join: the CLI, as JSON and as a table, and --watch
    assert status.main([f"{HOST}:{port}", "--json"]) == 0
    (g,) = json.loads(capsys.readouterr().out)
    assert g["epoch"] == 2 and g["active_mask"] == [1, 1, 1, 1] and not g["joiners_waiting"]
    assert g["ranks"][0]["incarnations"] == 2 and "joined" in g["last_decision"]["cause"]
    assert g["ranks"][0]["joins"][-1]["activated_in"] == 2, g
    assert status.main([f"tcp://{HOST}:{port}", "--watch", "0.05", "--count", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("epoch 2, active 1111 (4 of 4), joiners waiting: none") == 2, text


def test_status_bad_and_unreachable_stores(capsys):
    assert status.main(["nonsense"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    from .etcd_cluster import _free_ports

    (free,) = _free_ports(1)
    t0 = time.monotonic()
    assert status.main([f"{HOST}:{free}", "--timeout", "0.5"]) == 1
    assert "cannot reach" in capsys.readouterr().err and time.monotonic() - t0 < 10
