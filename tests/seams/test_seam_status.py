"""`elasticpg status` over a real c10d HashStore, in-process: groups written through GroupStore
(the real key layout, under torch's nested PrefixStores) read back as views, rank states and
join attempts."""

from __future__ import annotations

import torch.distributed as dist

from elasticpg.cli import status
from elasticpg.control.group_store import GroupStore
from elasticpg.core.group_state import JoinAttempt
from elasticpg.core.membership import View


def _group(root: dist.Store, *prefixes: str) -> GroupStore:
    store = root
    for p in prefixes:
        store = dist.PrefixStore(p, store)
    return GroupStore(store, timeout=5.0)


def _founded(g: GroupStore, world: int) -> None:
    for r in range(world):
        g.register(r)
        g.publish_endpoint(r, "10.0.0.1", 7000 + r, 1)
    g.announce_founders(world, world)


def test_views_rank_states_and_join_attempts():
    root = dist.HashStore()
    main = _group(root, "default_pg", "0/", "cpu/")
    _founded(main, 4)
    failed = View.initial(4, range(4)).after_failure([1, 2], 17, "rank 1: connection closed")
    assert main.propose_view(failed) == failed
    # slot 1: a replacement whose first attempt gave up and whose second one waits;
    # slot 2: a replacement the members are admitting right now
    main.register(1)
    first, second = JoinAttempt(1, 2, 1), JoinAttempt(1, 2, 2)
    main.open_join(first)
    assert main.abandon_join(first)
    main.open_join(second)
    main.register(2)
    admitting = JoinAttempt(2, 2, 1)
    main.open_join(admitting)
    assert main.admit_join(admitting, 20)

    sub = _group(root, "default_pg", "1/", "cpu/")  # a subgroup: founding view only
    _founded(sub, 2)

    groups = status.collect(root)
    assert [g["group"] for g in groups] == ["default_pg/0/cpu", "default_pg/1/cpu"]
    g, s = groups
    assert g["epoch"] == 1 and g["active_mask"] == [1, 0, 0, 1] and g["start_seq"] == 17
    assert g["members"] == ["active", "inactive", "inactive", "active"]
    assert g["last_decision"] == {"epoch": 1, "cause": "rank 1: connection closed",
                                  "start_seq": 17}
    assert [r["state"] for r in g["ranks"]] == ["active", "joining", "admitting", "active"]
    assert g["joiners_waiting"] == [1]
    assert [r["incarnations"] for r in g["ranks"]] == [1, 2, 2, 1]
    assert g["ranks"][0]["endpoint"] == "10.0.0.1:7000"
    assert [(j["attempt"], j["state"]) for j in g["ranks"][1]["joins"]] == [
        (1, "abandoned"), (2, "waiting")]
    assert s["epoch"] == 0 and s["last_decision"] is None and s["active_mask"] == [1, 1]

    text = status.render(groups, "here")
    assert "group default_pg/0/cpu: epoch 1, active 1001 (2 of 4), joiners waiting: [1]" in text
    assert "last decision: epoch 1 from op 17: rank 1: connection closed" in text
    assert "2.1 abandoned, 2.2 waiting" in text and "2.1 admitting@20" in text
    assert "group default_pg/1/cpu: epoch 0, active 11 (2 of 2)" in text
    assert "none yet (the founding view)" in text


def test_an_activated_join_and_an_empty_store():
    root = dist.HashStore()
    g = _group(root, "0/", "cpu/")
    _founded(g, 2)
    out = View.initial(2, range(2)).after_failure([1], 3)
    g.propose_view(out)
    back, _ = out.after_activation([1], {1}, 9)
    g.propose_view(back)
    join = JoinAttempt(1, 2, 1)
    g.open_join(join)
    g.admit_join(join, 9)
    g.announce_joined(join, back)
    (st,) = status.collect(root)
    assert st["epoch"] == 2 and st["active_mask"] == [1, 1] and not st["joiners_waiting"]
    assert st["ranks"][1]["joins"][0]["activated_in"] == 2
    assert "2.1 admitted in epoch 2" in status.render([st], "here")
    assert status.collect(dist.HashStore()) == []
    assert status.render([], "somewhere") == "no elasticpg group in somewhere"
