"""The launcher's pure parts, in-process: the restart policy's decision table, output
prefixing, the worker environment and the replacement hook of the backend creator."""

from __future__ import annotations

import signal

import pytest

from elasticpg.launcher.environment import (
    WorkerSlot,
    WorkerStore,
    is_replacement,
    restart_count,
    worker_env,
)
from elasticpg.launcher.output import PrefixedLines, prefix_for
from elasticpg.launcher.policy import (
    Decision,
    ExitCode,
    RestartPolicy,
    SlotStatus,
    Supervision,
    describe_status,
)
from elasticpg.options import Options
from elasticpg.torch_binding import registration

KILLED = -signal.SIGKILL


def started(n: int = 3, **kw) -> Supervision:
    sup = Supervision(list(range(n)), kw.pop("policy", RestartPolicy(2, 1.0, 3.0)), **kw)
    assert [o.decision for o in sup.due(0.0)] == [Decision.START] * n
    return sup


def test_every_slot_finishing_is_success():
    sup = started()
    for r in range(3):
        out = sup.exited(r, 0, 1.0)
        assert out.decision == Decision.FINISHED and out.slot.status == SlotStatus.FINISHED
    assert sup.done() and sup.exit_code() == ExitCode.FINISHED == 0
    assert sup.summary()[0] == "3 ranks, 0 restarts; exit 0 (all finished)"


def test_a_death_restarts_only_that_slot_with_doubling_capped_backoff():
    sup = started()
    delays = []
    now = 10.0
    for expected in (1.0, 2.0):
        out = sup.exited(1, KILLED, now)
        assert out.decision == Decision.RESTART and out.delay == expected
        delays.append(out.delay)
        assert "killed by SIGKILL; restarting it as a replacement" in out.message
        assert sup.due(now + expected - 0.01) == []  # not before its time
        assert sup.next_start() == now + expected
        (start,) = sup.due(now + expected)
        assert start.decision == Decision.START and start.slot.restarts == len(delays)
        assert "as a replacement" in start.message
        now += expected + 1
    assert [s.status for s in sup.slots] == [SlotStatus.RUNNING] * 3  # the others untouched
    assert RestartPolicy(9, 1.0, 3.0).delay_before(3) == 3.0  # 4 s capped at 3
    assert RestartPolicy(9, 0.0, 0.0).delay_before(5) == 0.0


def test_a_slot_is_given_up_on_after_k_restarts_and_the_run_goes_on():
    sup = started()
    for _ in range(2):
        sup.exited(2, 3, 0.0)
        sup.due(100.0)
    out = sup.exited(2, 3, 200.0)
    assert out.decision == Decision.GIVE_UP
    assert out.message == ("giving up on rank 2: exit status 3 after 2 restarts "
                           "(--max-restarts 2)")
    assert not sup.done()  # ranks 0 and 1 still serve
    sup.exited(0, 0, 201.0)
    sup.exited(1, 0, 201.0)
    assert sup.done() and sup.exit_code() == ExitCode.GAVE_UP
    assert sup.summary()[3] == ("rank 2: given up: exit status 3 after 2 restarts "
                                "(--max-restarts 2); 2 restarts; exits: exit status 3, "
                                "exit status 3, exit status 3")


def test_max_restarts_zero_gives_up_at_the_first_death():
    sup = started(policy=RestartPolicy(0))
    assert sup.exited(0, 1, 0.0).decision == Decision.GIVE_UP


def test_too_few_left_stops_everything():
    sup = started(min_workers=3)
    sup.exited(0, KILLED, 0.0)  # rank 0 waits for its restart
    out = sup.exited(1, KILLED, 0.0)
    assert out.decision == Decision.RESTART
    sup.policy = RestartPolicy(0)  # from now on: no restarts left
    out = sup.exited(2, 5, 0.5)
    assert out.decision == Decision.TOO_FEW and "fewer than --min-workers 3" in out.message
    assert sup.slots[0].status == sup.slots[1].status == SlotStatus.STOPPED  # not restarted
    assert sup.done() and sup.exit_code() == ExitCode.TOO_FEW


def test_too_few_stops_the_running_ones_as_they_end():
    sup = started(min_workers=3, policy=RestartPolicy(0))
    assert sup.exited(2, 1, 0.0).decision == Decision.TOO_FEW
    assert sup.exited(0, -signal.SIGTERM, 0.1).decision == Decision.STOPPED
    assert sup.exited(1, 0, 0.1).decision == Decision.STOPPED
    assert sup.exit_code() == 4 and sup.slots[0].reason.startswith("only 2 of 3 ranks left")


def test_a_replacement_with_nobody_left_to_join_is_not_started():
    sup = started(2)
    sup.exited(0, 0, 0.0)
    out = sup.exited(1, KILLED, 1.0)  # the last one running
    assert out.decision == Decision.GIVE_UP and "no other rank is left to join" in out.message
    # with other nodes, this launcher cannot know: it restarts
    sup = started(2, peers_elsewhere=True)
    sup.exited(0, 0, 0.0)
    assert sup.exited(1, KILLED, 1.0).decision == Decision.RESTART


def test_a_backoff_that_ends_after_the_others_finished_gives_up():
    sup = started(2)
    assert sup.exited(1, KILLED, 0.0).decision == Decision.RESTART
    sup.exited(0, 0, 0.5)
    (out,) = sup.due(5.0)
    assert out.decision == Decision.GIVE_UP and out.slot.rank == 1
    assert sup.done() and sup.exit_code() == ExitCode.GAVE_UP


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_pending_restarts_and_says_so_in_the_exit_code(sig):
    sup = started()
    sup.exited(0, KILLED, 0.0)  # pending restart
    assert sup.interrupt(sig) is True
    assert sup.interrupt(sig) is False  # the second one: the shell escalates
    assert sup.slots[0].status == SlotStatus.STOPPED and sup.due(100.0) == []
    assert sup.exited(1, -sig, 0.1).decision == Decision.STOPPED
    assert sup.exited(2, 1, 0.1).decision == Decision.STOPPED  # never restarted now
    assert sup.done() and sup.exit_code() == 128 + sig
    assert f"interrupted by {signal.Signals(sig).name}" in sup.summary()[0]


def test_bad_uses_are_clear_errors():
    sup = started()
    sup.exited(0, 0, 0.0)
    with pytest.raises(ValueError, match="no running worker"):
        sup.exited(0, 0, 0.0)
    with pytest.raises(ValueError, match="min_workers"):
        Supervision([0, 1], RestartPolicy(), min_workers=3)
    with pytest.raises(ValueError, match="max_restarts"):
        RestartPolicy(-1)
    with pytest.raises(ValueError, match="delays"):
        RestartPolicy(1, -1.0)


def test_describe_status():
    assert describe_status(0) == "exit status 0"
    assert describe_status(-9) == "killed by SIGKILL"
    assert describe_status(-200) == "killed by signal 200"


def test_output_lines_are_prefixed_whole():
    lines = PrefixedLines(prefix_for(3, 2))
    assert prefix_for(3, 0) == b"[rank 3] "
    assert lines.feed(b"par") == b""
    assert lines.feed(b"tial\nsecond\nthi") == b"[rank 3 #2] partial\n[rank 3 #2] second\n"
    assert lines.feed(b"\n\n") == b"[rank 3 #2] thi\n[rank 3 #2] \n"
    assert lines.feed(b"no newline at the end") == b""
    assert lines.close() == b"[rank 3 #2] no newline at the end\n"
    assert lines.close() == b""


def test_worker_env_is_torchruns_plus_the_replacement_mark():
    slot = WorkerSlot(local_rank=1, nproc_per_node=2, node_rank=1, nnodes=2)
    env = worker_env(slot, 2, WorkerStore("10.0.0.1", 29500), "job7", 3,
                     base={"PATH": "/bin", "ELASTICPG_INIT_METHOD": "etcd://old:1/x"})
    assert env == {
        "PATH": "/bin", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "3",
        "ROLE_WORLD_SIZE": "4", "ROLE_NAME": "default", "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500", "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_RUN_ID": "job7", "ELASTICPG_REPLACEMENT": "1",
        "ELASTICPG_RESTART_COUNT": "2", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = worker_env(slot, 0, WorkerStore("h", 1), "j", 3, base={"OMP_NUM_THREADS": "4"})
    assert first["ELASTICPG_REPLACEMENT"] == "0" and first["OMP_NUM_THREADS"] == "4"
    # an etcd store: its URL, and none of a TCPStore's variables (not even inherited ones)
    etcd = worker_env(slot, 0, WorkerStore(url="etcd://a:1,b:2/job"), "j", 3,
                      base={"MASTER_ADDR": "x", "MASTER_PORT": "1"})
    assert etcd["ELASTICPG_INIT_METHOD"] == "etcd://a:1,b:2/job"
    assert not {"MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"} & set(etcd)


def test_is_replacement_and_restart_count_read_the_environment(monkeypatch):
    monkeypatch.delenv("ELASTICPG_REPLACEMENT", raising=False)
    monkeypatch.delenv("ELASTICPG_RESTART_COUNT", raising=False)
    assert not is_replacement() and restart_count() == 0
    monkeypatch.setenv("ELASTICPG_REPLACEMENT", "1")
    monkeypatch.setenv("ELASTICPG_RESTART_COUNT", "2")
    assert is_replacement() and restart_count() == 2
    monkeypatch.setenv("ELASTICPG_RESTART_COUNT", "two")
    with pytest.raises(ValueError, match="ELASTICPG_RESTART_COUNT"):
        restart_count()


def test_the_backend_creator_isolates_a_replacements_groups_until_it_joined(monkeypatch):
    monkeypatch.setattr(registration, "_joined", False)
    monkeypatch.delenv("ELASTICPG_REPLACEMENT", raising=False)
    opts = Options(failure_timeout=5.0)
    assert registration._as_replacement(opts) is opts  # not launched as a replacement
    monkeypatch.setenv("ELASTICPG_REPLACEMENT", "1")
    ext = registration._as_replacement(opts)
    assert ext.is_extension and ext.failure_timeout == 5.0 and not opts.is_extension
    registration.note_joined()  # what elasticpg.join_group does once it succeeded
    assert registration._as_replacement(opts) is opts
