"""The demo's pure parts in-process: placement and routing, the model, settings, the report."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticpg.demo.cli import build_parser, parse_event, settings_from
from elasticpg.demo.display import Progress
from elasticpg.demo.model import ExpertShard, ModelShape, ReferenceModel, request_inputs
from elasticpg.demo.placement import Placement, PlacementError
from elasticpg.demo.report import analyse, ascii_timeline, render, write_png
from elasticpg.demo.settings import DemoSettings, SettingsError, validate
from elasticpg.demo.worker import share


@st.composite
def layouts(draw):
    ranks = draw(st.integers(1, 8))
    replicas = draw(st.integers(1, ranks))
    unit = ranks // __import__("math").gcd(ranks, replicas)
    experts = unit * draw(st.integers(1, 4))
    return Placement(ranks, experts, replicas)


@given(layouts())
@settings(max_examples=200, deadline=None)
def test_every_copy_on_its_own_rank_and_every_rank_full(p):
    logical = p.logical_of_slot()
    assert sorted(logical) == sorted(list(range(p.num_experts)) * p.replicas)
    for j, slots in enumerate(p.slots_of_expert()):
        assert len({p.rank_of_slot(s) for s in slots}) == p.replicas, j
    for r in range(p.num_ranks):
        assert len(p.local_slots(r)) == p.slots_per_rank


@given(layouts(), st.data())
@settings(max_examples=200, deadline=None)
def test_routing_reaches_a_live_copy_of_the_chosen_expert(p, data):
    dead = data.draw(st.sets(st.integers(0, p.num_ranks - 1), max_size=p.replicas - 1))
    mask = [0 if r in dead else 1 for r in range(p.num_ranks)]
    t = data.draw(st.integers(0, 12))
    picks = torch.tensor(data.draw(st.lists(
        st.lists(st.integers(-1, p.num_experts - 1), min_size=2, max_size=2),
        min_size=t, max_size=t)), dtype=torch.int64).reshape(t, 2)
    ids = torch.arange(100, 100 + t)
    slots = p.route(picks, ids, mask)
    logical = p.logical_of_slot()
    for (a, b), (sa, sb) in zip(picks.tolist(), slots.tolist(), strict=True):
        for pick, slot in ((a, sa), (b, sb)):
            if pick < 0:
                assert slot == -1
            else:
                assert logical[slot] == pick and mask[p.rank_of_slot(slot)]


def test_routing_balances_over_replicas_and_rebalances_after_recovery():
    p = Placement(4, 8, 2)
    picks = torch.zeros(1000, 1, dtype=torch.int64)  # every token wants expert 0
    ids = torch.arange(1000)
    full = p.route(picks, ids, [1, 1, 1, 1])
    assert sorted(torch.bincount(full.flatten()).nonzero().flatten().tolist()) \
        == p.slots_of_expert()[0]
    assert torch.bincount(full.flatten()).max() == 500  # half to each copy
    dead = p.rank_of_slot(p.slots_of_expert()[0][0])
    mask = [0 if r == dead else 1 for r in range(4)]
    assert set(p.route(picks, ids, mask).flatten().tolist()) == {p.slots_of_expert()[0][1]}
    # the backups of one rank's experts are spread over more than one survivor
    backups = {p.rank_of_slot(s) for s in range(p.num_slots) if p.rank_of_slot(s) != dead
               and p.logical_of_slot()[s] in p.local_slots(dead)}
    assert len(backups) > 1


def test_impossible_layouts_are_refused():
    with pytest.raises(PlacementError, match="different ranks"):
        Placement(2, 4, 3)
    with pytest.raises(PlacementError, match="divide evenly"):
        Placement(4, 3, 1)
    with pytest.raises(PlacementError, match="no replica on an active rank"):
        Placement(4, 8, 2).live_slots([1, 0, 0, 1] if Placement(4, 8, 2).rank_of_copy(1, 0)
                                      in (1, 2) else [0, 1, 1, 0])


def test_shard_experts_are_the_reference_experts():
    shape = ModelShape(hidden=16, ffn=24, num_experts=4, top_k=2, layers=2)
    p = Placement(2, 4, 2)
    ref = ReferenceModel(shape)
    for rank in range(2):
        shard = ExpertShard(shape, p.local_slots(rank))
        for layer in range(2):
            for slot, j in enumerate(shard.logical):
                assert torch.equal(shard.layers[layer][slot].w1, ref.experts[layer][j].w1)
    ids = torch.tensor([3, 7])
    assert torch.equal(request_inputs(shape, ids)[1], request_inputs(shape, ids[1:])[0])
    out = ref.forward(ids)
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_shards_run_only_the_received_rows():
    shape = ModelShape(hidden=8, ffn=8, num_experts=2, top_k=1, layers=1)
    shard = ExpertShard(shape, [0, 1])
    x = torch.randn(2, 5, 8)
    out = shard.run(0, x, torch.tensor([2, 0], dtype=torch.int32))
    assert torch.allclose(out[0, :2], shard.layers[0][0](x[0, :2]))


def test_share_splits_a_batch_over_the_active_ranks():
    assert [share(10, [1, 1, 1, 1], r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [share(12, [1, 0, 1, 1], r) for r in (0, 2, 3)] == [(0, 4), (4, 8), (8, 12)]


@pytest.mark.parametrize("change, message", [
    (dict(ranks=1), "at least one more"),
    (dict(kill_rank=4), "not a rank"),
    (dict(kill_step=240), "beyond the run"),
    (dict(kill_step=0), "beyond the run"),
    (dict(warmup=200.0), "longer than the whole run"),
    (dict(experts=7, replicas=2, ranks=4), "do not divide"),
    (dict(ranks=4, experts=1, replicas=2), "more ranks"),
    (dict(replicas=1), "copy on another rank"),
    (dict(replicas=5), "different ranks"),
    (dict(top_k=9), "top-k"),
    (dict(join_mode="later"), "join-mode"),
    (dict(warmup=float("nan")), "finite"),
])
def test_impossible_settings_say_why(change, message):
    with pytest.raises(SettingsError, match=message):
        validate(replace(DemoSettings(), **change))


def test_command_line_to_settings_and_back():
    args = build_parser().parse_args(["--ranks", "4", "--kill-step", "9", "--steps", "20",
                                      "--top-k", "1", "--join-mode", "sync"])
    s = settings_from(args)
    assert (s.kill_step, s.top_k, s.join_mode) == (9, 1, "sync")
    assert DemoSettings.from_json(s.to_json()) == s
    with pytest.raises(SettingsError, match="unknown"):
        DemoSettings.from_json(json.dumps({"bogus": 1}))
    assert parse_event('[rank 1 #1] @demo {"ev": "kill", "t": 1}') == {"ev": "kill", "t": 1}
    assert parse_event("[rank 1] @demo {cut") is None
    assert parse_event("[rank 1] hello") is None


def _step(rank, step, t0, t1, begin, end, mask, committed=True, err=None, attempt=0):
    return {"ev": "step", "rank": rank, "step": step, "attempt": attempt, "t": t1, "t0": t0,
            "t1": t1, "committed": committed, "begin": begin, "end": end, "mask": mask,
            "epoch": 0, "received": 0, "err": err}


def synthetic_run():
    """4 ranks, batch 8, a step every 0.1 s; rank 1 dies in step 5 (at 0.55 s), seen at 0.56,
    step 5 is served again; the replacement is active at 1.5 s (started at 0.6)."""
    ev, full, hole = [], [1, 1, 1, 1], [1, 0, 1, 1]
    for step in range(15):
        t0, t1 = step * 0.1, step * 0.1 + 0.09
        if step == 5:
            ev += [_step(r, 5, t0, t1, 0, 0, full, committed=False) for r in (0, 2, 3)]
            ev.append({"ev": "kill", "rank": 1, "step": 5, "layer": 2, "t": 0.55})
            ev.append({"ev": "failure_seen", "rank": 2, "step": 5, "where": "combine, layer 2",
                       "seen_t": 0.56, "mask": hole, "t": 0.59})
        mask = hole if 5 <= step < 15 and step * 0.1 < 1.5 else full
        ranks = [r for r in range(4) if mask[r]]
        split = [(0, 3), (3, 6), (6, 8)] if len(ranks) == 3 else [(0, 2), (2, 4), (4, 6), (6, 8)]
        for r, (b, e) in zip(ranks, split, strict=True):
            ev.append(_step(r, step, t0 + 0.01 * (step == 5), t1 + 0.02 * (step == 5),
                            step * 8 + b, step * 8 + e, mask, err=0.0 if step % 5 == 0 else None))
    ev.append({"ev": "start", "rank": 1, "pid": 9, "started": 0.6, "imported": 0.7, "restart": 1,
               "replacement": True, "t": 0.6})
    ev.append({"ev": "warmup_start", "rank": 1, "isolated": True, "t": 0.8})
    ev.append({"ev": "warmup_end", "rank": 1, "passes": 40, "t": 1.4})
    ev += [{"ev": "admitted", "rank": r, "step": 15, "ranks": [1], "t0": 1.49, "stall": 0.003,
            "mask": [1, 1, 1, 1], "epoch": 2, "t": 1.493} for r in (0, 2, 3)]
    ev.append({"ev": "active", "rank": 1, "started": 0.6, "join_called": 1.41, "step": 15,
               "mask": [1, 1, 1, 1], "epoch": 2, "t": 1.5})
    return sorted(ev, key=lambda e: e["t"])


def test_report_numbers_from_events():
    s = json.loads(replace(DemoSettings(), tokens=2, ranks=4).to_json())
    r = analyse(synthetic_run(), s)
    assert r["detection_ms"] == pytest.approx(10.0)
    assert r["survivors_resume_ms"] == pytest.approx((0.59 + 0.02 - 0.55) * 1e3, abs=0.2)
    assert r["admission_stall_ms"] == 3.0
    assert r["replacement"]["start_to_active_ms"] == pytest.approx(900.0)
    assert r["replacement"]["join_call_to_active_ms"] == pytest.approx(90.0)
    assert r["requests"] == {"total": 120, "served": 120, "dropped": 0, "served_twice": 0,
                             "delayed": 8, "steps_redone": [5], "open_loop_delayed_estimate": 0}
    assert r["idle_after_kill_ms"] == 0.0  # the redone step took 0.12 s, not > 3 steps
    # re-balancing: rank 1's rows are missing during the outage, every rank's after it
    assert r["expert_rows_per_rank"]["during"][1] is None
    assert None not in r["expert_rows_per_rank"]["before"]
    assert all(p["ok"] for p in r["reference_check"].values())
    assert r["throughput_rps"]["before"] == pytest.approx(5 * 8 / 0.55, rel=0.01)
    assert r["timeline"]["kill_s"] == 0.55 and r["timeline"]["join_s"] == 1.5
    text = render([r, {**r, "join_mode": "sync"}])
    assert "deferred join" in text and "sync join" in text and "3.0 ms" in text
    chart = ascii_timeline(r)
    assert "K" in chart and "J" in chart and "w" in chart


def test_report_counts_a_lost_request_as_dropped(tmp_path):
    events = [e for e in synthetic_run() if not (e["ev"] == "step" and e["step"] == 3
                                                  and e["rank"] == 2)]
    r = analyse(events, json.loads(replace(DemoSettings(), tokens=2).to_json()))
    assert r["requests"]["dropped"] == 2
    bad = [dict(e, err=1.0) if e["ev"] == "step" and e["err"] is not None else e
           for e in synthetic_run()]
    r = analyse(bad, json.loads(replace(DemoSettings(), tokens=2).to_json()))
    assert not r["reference_check"]["before"]["ok"]
    png = tmp_path / "t.png"
    if write_png([r], str(png)):
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_progress_follows_the_story():
    p = Progress("deferred", 4, 15, 1)
    for e in synthetic_run():
        p.feed(e, 1e-4)
    assert p.step == 14 and p.mask == [1, 0, 1, 1] and p.checks == 10 and p.bad_checks == 0
    story = "\n".join(p.news)
    for words in ("SIGKILLed inside step 5", "saw the failure", "served again",
                  "warming up", "admitted at step 15", "replacement active"):
        assert words in story


def test_rich_view_draws_the_story():
    pytest.importorskip("rich", reason="rich is the optional `demo` extra")
    import io

    from rich.console import Console

    from elasticpg.demo.display import RichView

    p = Progress("deferred", 4, 15, 1)
    view = RichView(p)
    view.console = Console(file=io.StringIO(), width=120, force_terminal=True)
    view.live = __import__("rich.live", fromlist=["Live"]).Live(console=view.console)
    with view:
        for e in synthetic_run():
            p.feed(e, 1e-4)
            view.update()
    text = view.console.file.getvalue()
    assert "deferred join" in text and "replacement active" in text


def test_partial_routing_masks_experts_without_a_live_copy():
    p = Placement(4, 8, 2)
    alone = [0, 1, 0, 0]
    picks = torch.tensor([[j, (j + 1) % 8] for j in range(8)])
    slots = p.route(picks, torch.arange(8), alone, partial=True)
    held = set(p.local_slots(1))
    for (a, b), (sa, sb) in zip(picks.tolist(), slots.tolist(), strict=True):
        for pick, slot in ((a, sa), (b, sb)):
            assert (slot == -1) == (pick not in held)
            assert slot == -1 or p.rank_of_slot(slot) == 1
    with pytest.raises(PlacementError):
        p.route(picks, torch.arange(8), alone)
