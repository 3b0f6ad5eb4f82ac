"""elasticpg.compat.mooncake: programs written the way Mooncake PG's users write them
(`from mooncake import pg`, backend "mooncake-cpu", `MooncakeBackendOptions`, functions taking
`group._get_backend(device)`) run on elasticpg. Real processes for everything multi-rank."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import elasticpg
import elasticpg.api
from elasticpg.compat import mooncake as compat

from .harness import HOST, only_victim_died, serving_steps

REPLACEMENT = 4  # pool worker that plays the replacement process


def _connect(port: int) -> dist.Store:
    return dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))


def _init(rank: int, world: int, store: dist.Store, options) -> None:
    dist.init_process_group(backend="mooncake-cpu", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=30), pg_options=options)


def _backend():
    return dist.group.WORLD._get_backend(torch.device("cpu"))


def _sum(x: int) -> int:
    t = torch.tensor([x], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


# ---- a rank dies: collectives through the alias, the caller-owned mask mirror --------------------

def job_alias_collectives_and_hole(rank: int, world: int, port: int) -> dict:
    assert compat.install_alias()
    from mooncake import pg

    active_ranks = torch.zeros(world, dtype=torch.int32)  # caller-owned: the backend fills it
    options = pg.MooncakeBackendOptions(active_ranks)
    options.failure_timeout = 5.0
    _init(rank, world, _connect(port), options)
    backend = _backend()
    out = {"name": dist.get_backend(), "mirror0": active_ranks.tolist(),
           "active0": pg.get_active_ranks(backend).tolist(),
           "epoch0": pg.get_current_epoch(backend), "synced0": pg.get_num_synced_ranks(backend)}
    out["sum"] = _sum(rank + 1)
    gathered = torch.zeros(world, dtype=torch.int32)
    dist.all_gather_into_tensor(gathered, torch.tensor([rank * 10], dtype=torch.int32))
    out["gathered"] = gathered.tolist()
    dist.barrier()
    if rank == 1:
        os._exit(0)
    t = torch.tensor([rank + 1], dtype=torch.int32)
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    out["survivor_sum"] = int(t.item())
    out["local_success"] = pg.get_local_success(work)
    out["hint"] = pg.get_failed_ranks_hint(work).tolist()
    out["mirror"] = active_ranks.tolist()  # default mode: the hole is there when the op returns
    out["active"] = pg.get_active_ranks(backend).tolist()
    sync = pg.sync_after_failure(backend)
    out["sync"] = (sync.status in (pg.SyncAfterFailureStatus.Reconciled,
                                   pg.SyncAfterFailureStatus.NoPending), sync.reject_reason)
    out["epoch"] = pg.get_current_epoch(backend)
    out["peer_state"] = pg.get_peer_state(backend, [0, 1, 2, 3])
    out["synced"] = pg.get_num_synced_ranks(backend)
    out["again"] = _sum(rank + 1)
    out["mirror_again"] = active_ranks.tolist()
    return out


def test_alias_collectives_and_live_mask_mirror_after_a_death(pool):
    res = pool.run_raw(job_alias_collectives_and_hole, timeout=60)
    assert res[1].status == "dead"
    for r in (0, 2, 3):
        assert res[r].status == "ok", res[r].value
        v = res[r].value
        assert v["name"] == "mooncake-cpu", v
        assert v["mirror0"] == v["active0"] == [1, 1, 1, 1], v
        assert v["epoch0"] == 0 and v["synced0"] == 4, v
        assert v["sum"] == 10 and v["gathered"] == [0, 10, 20, 30], v
        assert v["survivor_sum"] == 1 + 3 + 4, v
        # the op in which rank 1 was found dead reports it; a later op is clean
        if not v["local_success"]:
            assert v["hint"][1] == 1, v
        assert v["mirror"] == v["active"] == [1, 0, 1, 1], v
        assert v["sync"] == (True, ""), v
        assert v["epoch"] >= 1, v
        assert v["peer_state"] == [True, False, True, True], v
        assert v["synced"] == 3, v
        assert v["again"] == 8 and v["mirror_again"] == [1, 0, 1, 1], v
    assert len({res[r].value["epoch"] for r in (0, 2, 3)}) == 1


# ---- deferred join of a replacement with the (max_group_size, is_extension) form ---------------

def _wait_until_ready(pg, backend, ranks: list[int], timeout: float = 30.0) -> bool:
    """The reference's own test idiom: poll get_peer_state with no collective in between."""
    deadline = time.monotonic() + timeout
    while not all(pg.get_peer_state(backend, ranks)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)  # the polling interval of the user's wait loop, not synchronisation
    return True


def job_deferred_join(rank: int, world: int, port: int, style: str = "serving") -> dict:
    compat.install_alias()
    from mooncake import pg

    store = _connect(port)
    if rank == REPLACEMENT:
        store.wait(["survivors-ready"], timedelta(seconds=30))
        options = pg.MooncakeBackendOptions(4, is_extension=True, failure_timeout=5.0)
        _init(1, 4, store, options)
        backend = _backend()
        out = {"isolated": _sum(2), "world": dist.get_world_size(),
               "state_before": pg.get_peer_state(backend, [1])}
        t_end = time.monotonic() + 0.5  # "warm-up": local-only collectives
        while time.monotonic() < t_end:
            _sum(2)
        pg.join_group(backend)
        out["after"] = _sum(2)
        out["active"] = pg.get_active_ranks(backend).tolist()
        return out
    # the four founders: the 4-argument integer form, default failure handling spelled out
    options = pg.MooncakeBackendOptions(4, False, True, True)
    options.failure_timeout = 5.0
    _init(rank, 4, store, options)
    backend = _backend()
    dist.barrier()
    if rank == 1:
        os._exit(0)
    out = {"first": _sum(rank + 1), "active": pg.get_active_ranks(backend).tolist()}
    if store.add("survivors", 1) == 3:
        store.set("survivors-ready", "1")
    sums = set()
    for _ in serving_steps():  # serving loop: one collective per step, poll, admit when ready
        sums.add(_sum(rank + 1))
        if style == "wait_loop" and not _wait_until_ready(pg, backend, [1]):
            raise AssertionError("replacement never seen ready")
        if pg.get_peer_state(backend, [1]) == [True]:
            resp = pg.recover_ranks(backend, [1])
            out["status"] = resp.status == pg.ViewUpdateStatus.Applied
            out["dropped"] = resp.dropped_ranks
            out["new_epoch"] = resp.new_epoch
            break
    out["sums_before"] = sorted(sums)
    out["after"] = _sum(rank + 1)
    out["active_after"] = pg.get_active_ranks(backend).tolist()
    out["epoch"] = pg.get_current_epoch(backend)
    return out


@pytest.mark.parametrize("style", ["serving", "wait_loop"])
def test_deferred_join_of_a_replacement_through_the_alias(pool, style):
    res = pool.run_raw(job_deferred_join, style, world=5, timeout=60)
    only_victim_died(res, 1)
    j = res[REPLACEMENT].value
    assert j["isolated"] == 2 and j["world"] == 4, j
    assert j["after"] == 10 and j["active"] == [1, 1, 1, 1], j
    for r in (0, 2, 3):
        v = res[r].value
        assert v["first"] == 8 and v["active"] == [1, 0, 1, 1], v
        assert v["sums_before"] == [8], v
        assert v["status"] is True and v["dropped"] == [], v
        assert v["after"] == 10 and v["active_after"] == [1, 1, 1, 1], v
        assert v["new_epoch"] == v["epoch"] == res[0].value["epoch"], v


# ---- legacy scale-up into a reserved slot: extend_group_size_to ---------------------------------

def job_extend_group_size(rank: int, world: int, port: int) -> dict:
    compat.install_alias()
    from mooncake import pg

    store = _connect(port)
    if rank == 3:  # the new process: slot 3 of 4, local-only until activated
        _init(3, 4, store, pg.MooncakeBackendOptions(4, True))
        backend = _backend()
        out = {"world": dist.get_world_size(), "isolated": _sum(4)}
        pg.join_group(backend)
        out["after"] = _sum(4)
        return out
    # the founders: 3 ranks, 4 slots, through the tensor form with max_group_size
    mirror = torch.zeros(4, dtype=torch.int32)
    _init(rank, 3, store, pg.MooncakeBackendOptions(mirror, False, 4))
    backend = _backend()
    out = {"world": dist.get_world_size(), "mirror0": mirror.tolist(), "before": _sum(rank + 1)}
    for _ in serving_steps():
        if pg.get_peer_state(backend, [3]) == [True]:
            out["synced"] = pg.get_num_synced_ranks(backend)
            out["status"] = pg.extend_group_size_to(backend, 4).status.name
            break
        _sum(0)
    out["after"] = _sum(rank + 1)
    out["mirror"] = mirror.tolist()
    return out


def test_extend_group_size_to_admits_a_reserved_slot(pool):
    res = pool.run(job_extend_group_size, world=4, timeout=60)
    assert res[3] == {"world": 4, "isolated": 4, "after": 10}
    for v in res[:3]:
        assert v["world"] == 3 and v["mirror0"] == [1, 1, 1, 0] and v["before"] == 6, v
        assert v["synced"] == 4 and v["status"] == "Applied", v
        assert v["after"] == 10 and v["mirror"] == [1, 1, 1, 1], v


# ---- graceful leave and in-place rejoin of a live rank, through the reference's names ----------

def job_leave_and_rejoin(rank: int, world: int, port: int) -> dict:
    compat.install_alias()
    from mooncake import pg

    _init(rank, world, _connect(port), pg.MooncakeBackendOptions(world, failure_timeout=5.0))
    backend = _backend()
    resp = pg.deactivate_ranks(backend, [3])  # collective: every active member names rank 3
    out = {"status": resp.status.name, "active": pg.get_active_ranks(backend).tolist()}
    if rank == 3:
        pg.join_group(backend)  # in-place rejoin
    else:
        out["without"] = _sum(rank + 1)
        for _ in serving_steps():
            if pg.get_peer_state(backend, [3]) == [True]:
                out["recover"] = pg.activate_ranks(backend, [3]).status.name
                break
            _sum(0)
    out["with"] = _sum(rank + 1)
    out["active_after"] = pg.get_active_ranks(backend).tolist()
    return out


def test_graceful_leave_and_in_place_rejoin(pool):
    res = pool.run(job_leave_and_rejoin, timeout=60)
    for r, v in enumerate(res):
        assert v["status"] == "Applied" and v["active"] == [1, 1, 1, 0], (r, v)
        assert v["with"] == 10 and v["active_after"] == [1, 1, 1, 1], (r, v)
        if r != 3:
            assert v["without"] == 6 and v["recover"] == "Applied", (r, v)


# ---- set_host_ip / set_device_filter inside a real group --------------------------------------

def job_host_ip(rank: int, world: int, port: int) -> dict:
    compat.install_alias()
    from mooncake import pg

    saved = os.environ.get(compat.HOST_ENV)
    try:
        pg.set_device_filter(["mlx5_0", "mlx5_1"])
        pg.set_host_ip("127.0.0.2")  # another loopback address: what the data plane binds
        _init(rank, world, _connect(port), pg.MooncakeBackendOptions(world))
        backend = _backend()
        return {"sum": _sum(rank + 1), "bound": backend.runtime.transport.endpoint[0],
                "filter": compat.get_device_filter()}
    finally:
        if saved is None:
            os.environ.pop(compat.HOST_ENV, None)
        else:
            os.environ[compat.HOST_ENV] = saved
        pg.set_device_filter([])


def test_set_host_ip_applies_to_groups_created_afterwards(pool):
    for v in pool.run(job_host_ip, world=2, timeout=30):
        assert v == {"sum": 3, "bound": "127.0.0.2", "filter": ["mlx5_0", "mlx5_1"]}


# ---- unit level: the options object, its errors, the alias, the names --------------------------

def test_tensor_form():
    active = torch.zeros(4, dtype=torch.int32)
    o = compat.MooncakeBackendOptions(active)
    opts = o.to_options()
    assert isinstance(opts, elasticpg.Options)
    assert opts.active_ranks is active  # the caller's tensor itself, so the mirror is live
    assert opts.max_group_size == 4 and not opts.is_extension
    assert opts.auto_deactivate_on_failure and opts.auto_sync_on_failure
    ext = compat.MooncakeBackendOptions(active, True).to_options()
    assert ext.is_extension and ext.active_ranks is active
    kw = compat.MooncakeBackendOptions(active_ranks=active, is_extension=True, max_group_size=4,
                                       failure_timeout=0.5, timeout=7.0, host="127.0.0.1")
    opts = kw.to_options()
    assert (opts.failure_timeout, opts.timeout, opts.host) == (0.5, 7.0, "127.0.0.1")
    assert "active_ranks=[0, 0, 0, 0]" in repr(kw)


def test_size_form():
    o = compat.MooncakeBackendOptions(8)
    opts = o.to_options()
    assert opts.max_group_size == 8 and opts.active_ranks is None and not opts.is_extension
    opts = compat.MooncakeBackendOptions(8, True).to_options()
    assert opts.is_extension and opts.auto_deactivate_on_failure and opts.auto_sync_on_failure
    opts = compat.MooncakeBackendOptions(8, False, True, False).to_options()
    assert opts.auto_deactivate_on_failure and not opts.auto_sync_on_failure
    opts = compat.MooncakeBackendOptions(8, False, False, False).to_options()
    assert not opts.auto_deactivate_on_failure and not opts.auto_sync_on_failure
    opts = compat.MooncakeBackendOptions(max_group_size=2, auto_deactivate=True,
                                         auto_sync=False).to_options()
    assert opts.max_group_size == 2 and not opts.auto_sync_on_failure
    o = compat.MooncakeBackendOptions(4)
    o.failure_timeout = 1.0  # elasticpg's own options may be set after construction
    assert o.to_options().failure_timeout == 1.0
    with pytest.raises(AttributeError):
        o.failure_timout = 1.0  # a typo is an error, not a silently ignored attribute


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((), {}, TypeError, "active_ranks tensor or an int max_group_size"),
    (([1, 1],), {}, TypeError, "max_group_size must be an int"),
    ((True,), {}, TypeError, "max_group_size must be an int"),
    ((2.0,), {}, TypeError, "max_group_size must be an int"),
    ((0,), {}, ValueError, "at least 1"),
    ((4, 1), {}, TypeError, "is_extension must be a bool"),
    ((4, False, True), {}, TypeError, "give both failure-handling flags"),
    ((4, False, True, True, 1), {}, TypeError, "at most 4 positional"),
    ((4, False, False, True), {}, ValueError, "auto_sync_on_failure=True requires"),
    ((4,), {"auto_deactivate_on_failure": False}, ValueError, "requires auto_deactivate"),
    ((4,), {"max_group_size": 4}, TypeError, "multiple values"),
    ((4,), {"auto_sync": True, "auto_sync_on_failure": True}, TypeError, "got both"),
    ((4,), {"bogus": 1}, TypeError, "unexpected keyword"),
    ((4,), {"failure_timeout": "1"}, TypeError, "failure_timeout must be a number"),
    ((4,), {"failure_timeout": 0}, ValueError, "failure_timeout must be positive"),
    ((4,), {"timeout": -1.0}, ValueError, "timeout must be positive"),
    ((4,), {"host": 5}, TypeError, "host must be"),
    ((torch.zeros(4, dtype=torch.int64),), {}, TypeError, "torch.int32"),
    ((torch.zeros(2, 2, dtype=torch.int32),), {}, ValueError, "1-D"),
    ((torch.zeros(0, dtype=torch.int32),), {}, ValueError, "non-empty"),
    ((torch.zeros(4, dtype=torch.int32), "yes"), {}, TypeError, "is_extension must be a bool"),
    ((torch.zeros(4, dtype=torch.int32), False, 8), {}, ValueError, "length must be"),
    ((torch.zeros(4, dtype=torch.int32), False, 4, True), {}, TypeError, "at most 3"),
    ((), {"active_ranks": [1, 1]}, TypeError, "must be a torch.Tensor"),
])
def test_options_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        compat.MooncakeBackendOptions(*args, **kwargs)


def test_options_rechecked_when_the_group_is_created():
    o = compat.MooncakeBackendOptions(4)
    o.auto_deactivate_on_failure = False  # now contradicts auto_sync_on_failure=True
    with pytest.raises(ValueError, match="requires auto_deactivate"):
        o.to_options()
    with pytest.raises(ValueError, match="smaller than the world size"):
        compat.MooncakeBackendOptions(2).to_options().validate(4)


def test_names_are_elasticpg_api_and_enums_match_the_reference():
    for name in ("get_active_ranks", "get_num_synced_ranks", "extend_group_size_to",
                 "get_peer_state", "recover_ranks", "activate_ranks",
                 "join_group", "sync_after_failure", "get_local_success",
                 "get_failed_ranks_hint", "get_current_epoch"):
        assert getattr(compat, name) is getattr(elasticpg.api, name), name
    # the one wrapper: naming only oneself leaves alone, as in the reference
    assert compat.deactivate_ranks is not elasticpg.api.deactivate_ranks
    assert compat.recover_ranks is compat.activate_ranks
    assert compat.ProposalStatus is elasticpg.ProposalStatus is compat.ViewUpdateStatus
    assert compat.SyncAfterFailureStatus is elasticpg.SyncAfterFailureStatus
    assert {s.name for s in compat.ProposalStatus} == {"Applied", "AppliedWithDroppedRanks",
                                                       "Rejected"}
    assert {s.name for s in compat.SyncAfterFailureStatus} == {"Reconciled", "NoPending",
                                                               "Rejected"}
    r = compat.ProposeViewUpdateResponse(compat.ProposalStatus.Applied, 3)
    assert (r.status, r.new_epoch, r.dropped_ranks, r.reject_reason) == (
        compat.ProposalStatus.Applied, 3, [], "")
    with pytest.raises(TypeError, match="not an elasticpg process group"):
        compat.get_active_ranks(object())
    with pytest.raises(TypeError, match="Work returned by an elasticpg operation"):
        compat.get_local_success(object())


def test_install_alias_and_register_backend():
    if "mooncake" not in sys.modules and importlib.util.find_spec("mooncake") is not None:
        pytest.skip("a real mooncake package is installed")
    try:
        assert compat.install_alias() and compat.install_alias()  # idempotent
        import mooncake.pg as pg2
        from mooncake import pg
        assert pg is pg2 is compat
        assert "MOONCAKE-CPU" in dist.Backend._plugins
    finally:
        compat.uninstall_alias()
    assert "mooncake" not in sys.modules and "mooncake.pg" not in sys.modules
    compat.register_backend("mooncake-cpu-test")
    compat.register_backend("mooncake-cpu-test")
    assert "MOONCAKE-CPU-TEST" in dist.Backend._plugins
    with pytest.raises(TypeError):
        compat.register_backend("")


def test_install_alias_leaves_a_real_mooncake_alone(monkeypatch):
    real = type(sys)("mooncake")
    monkeypatch.setitem(sys.modules, "mooncake", real)
    assert compat.install_alias() is False
    assert sys.modules["mooncake"] is real and "mooncake.pg" not in sys.modules
    compat.uninstall_alias()  # not ours: untouched
    assert sys.modules["mooncake"] is real


def test_set_host_ip_and_device_filter(monkeypatch):
    monkeypatch.setenv(compat.HOST_ENV, "127.0.0.1")  # restored after the test
    compat.set_host_ip("127.0.0.1")
    from elasticpg.group.runtime import default_host
    assert os.environ[compat.HOST_ENV] == "127.0.0.1" == default_host()
    compat.set_host_ip("localhost")
    assert default_host() == "localhost"
    with pytest.raises(TypeError):
        compat.set_host_ip(None)
    with pytest.raises(ValueError, match="IPv6"):
        compat.set_host_ip("::1")
    with pytest.raises(ValueError, match="cannot resolve"):
        compat.set_host_ip("no-such-host.invalid")
    assert default_host() == "localhost"  # a rejected address changes nothing
    try:
        compat.set_device_filter(["mlx5_0"])
        assert compat.get_device_filter() == ["mlx5_0"]
        compat.set_device_filter("mlx5_1")
        assert compat.get_device_filter() == ["mlx5_1"]
        with pytest.raises(TypeError):
            compat.set_device_filter([1])
        with pytest.raises(TypeError):
            compat.set_device_filter(3)
    finally:
        compat.set_device_filter([])
