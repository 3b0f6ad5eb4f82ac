"""Public functions of SPEC section 3 that act on a group handle or a Work.

Which calls are collective: `activate_ranks`/`recover_ranks`, `deactivate_ranks` are made by
every active member at the same point of its operation sequence (like a collective; members may
pass different rank lists, the union is applied). `sync_after_failure`, `get_peer_state`,
`get_active_ranks`, `get_current_epoch` and the per-Work queries are local to one rank.
`join_group` is called by the joining rank alone. `admit_ready_ranks` is collective (it may
call `recover_ranks`); `is_replacement` is local and reads only this process's environment.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import ElasticPGError
from .group.runtime import GroupRuntime
from .launcher import environment
from .telemetry import prometheus
from .torch_binding import registration
from .torch_binding.process_group import ElasticProcessGroup
from .torch_binding.work import ElasticWork


def runtime_of(group: object | None) -> GroupRuntime:
    """The runtime behind a ProcessGroup, `group._get_backend(device)`, or None (WORLD)."""
    pg = group if group is not None else dist.group.WORLD
    if pg is None:
        raise RuntimeError("no default process group: call dist.init_process_group first")
    if not isinstance(pg, ElasticProcessGroup):
        try:
            pg = pg._get_backend(torch.device("cpu"))
        except (RuntimeError, AttributeError):
            pass  # another backend's group, or not a group: reported just below
    if not isinstance(pg, ElasticProcessGroup):
        raise TypeError(f"{type(group).__name__} is not an elasticpg process group")
    return pg.runtime


def get_active_ranks(group: object | None = None) -> torch.Tensor:
    """The committed active mask: int32 tensor of length max_group_size (1 = active). It
    applies first what the next operation boundary would (in mode (a): a failure reported by
    the last operation, collective or point-to-point, is already a hole)."""
    return runtime_of(group).active_mask()


def get_current_epoch(group: object | None = None) -> int:
    """The epoch of the view this process has applied."""
    return runtime_of(group).view.epoch


def _work(work: object) -> ElasticWork:
    if not isinstance(work, ElasticWork):
        raise TypeError(f"expected a Work returned by an elasticpg operation, got "
                        f"{type(work).__name__}")
    return work


def get_local_success(work: object) -> bool:
    """Did every transfer this rank attempted in that operation succeed?"""
    w = _work(work)
    w.wait()
    return w.local_success


def get_failed_ranks_hint(work: object, size: int | None = None) -> torch.Tensor:
    """int32 mask of the ranks this rank saw fail in that operation."""
    w = _work(work)
    try:
        w.wait()
    except ElasticPGError:
        pass  # a failed operation: its failed ranks are what the caller asks for
    n = size if size is not None else max(w.group_slots, max([*w.failed_ranks, -1]) + 1)
    mask = torch.zeros(n, dtype=torch.int32)
    for r in w.failed_ranks:
        if r < n:
            mask[r] = 1
    return mask


class ProposalStatus(enum.Enum):
    Applied = "Applied"
    AppliedWithDroppedRanks = "AppliedWithDroppedRanks"
    Rejected = "Rejected"


class SyncAfterFailureStatus(enum.Enum):
    Reconciled = "Reconciled"
    NoPending = "NoPending"
    Rejected = "Rejected"


@dataclass
class ProposalResult:
    status: ProposalStatus
    new_epoch: int
    dropped_ranks: list[int] = field(default_factory=list)
    reject_reason: str = ""


@dataclass
class SyncAfterFailureResult:
    status: SyncAfterFailureStatus
    new_epoch: int
    reject_reason: str = ""


def _ranks(ranks: object) -> list[int]:
    if isinstance(ranks, torch.Tensor):
        return [int(r) for r in ranks.flatten().tolist()]
    if isinstance(ranks, int):
        return [ranks]
    return [int(r) for r in ranks]  # type: ignore[union-attr]


def deactivate_ranks(group: object | None, ranks: object) -> ProposalResult:
    """Collective: remove `ranks` from the group (scale-down, graceful leave, framework-managed
    failure handling). A rank may name itself; its next collective then raises."""
    rt = runtime_of(group)
    view = rt.deactivate(_ranks(ranks))
    return ProposalResult(ProposalStatus.Applied, view.epoch)


def sync_after_failure(group: object | None = None) -> SyncAfterFailureResult:
    """Local: report failures this rank saw, wait for the decision, apply the latest view."""
    status, view = runtime_of(group).sync_after_failure()
    reason = "this rank was removed from the group" if status == "Rejected" else ""
    return SyncAfterFailureResult(SyncAfterFailureStatus(status), view.epoch, reason)


def get_peer_state(group: object | None, ranks: object) -> list[bool]:
    """Local and cheap (no I/O): True per rank that is active (and not seen failed by this
    rank), or ready to be activated as agreed by every active member at the last all-to-all
    collective (so every member gets the same answer at the same step of a serving loop)."""
    return runtime_of(group).peer_state(_ranks(ranks))


def activate_ranks(group: object | None, ranks: object) -> ProposalResult:
    """Collective: admit the ready ones of `ranks`; from the next collective on they take part."""
    rt = runtime_of(group)
    view, admitted, dropped = rt.activate(_ranks(ranks))
    names = sorted(dropped)
    if not admitted and dropped:
        reason = "; ".join(f"rank {r}: {why}" for r, why in sorted(dropped.items()))
        return ProposalResult(ProposalStatus.Rejected, view.epoch, names, reason)
    status = ProposalStatus.AppliedWithDroppedRanks if dropped else ProposalStatus.Applied
    return ProposalResult(status, view.epoch, names)


recover_ranks = activate_ranks


def join_group(group: object | None = None, timeout: float | None = None) -> int:
    """Joiner side: quiesce, declare ready, block until the active members admit this rank;
    returns the epoch of the view that activated it. Used by extension/replacement ranks after
    warm-up and by live ranks that were deactivated (in-place rejoin)."""
    epoch = runtime_of(group).join(timeout).epoch
    registration.note_joined()
    return epoch


def is_replacement() -> bool:
    """Local: was this process started by `elasticpg run` to refill the slot of a worker that
    died? Its groups then start Isolated (until its first join_group): warm up, then call
    `join_group` on each group, in creation order."""
    return environment.is_replacement()


def admit_ready_ranks(group: object | None = None) -> list[int]:
    """Collective, once per serving step: admit every inactive slot whose joiner is ready.

    Polls `get_peer_state` for the group's inactive slots and calls `recover_ranks` for the
    ready ones; returns the ranks admitted (usually []: nothing to do, no I/O). Every active
    member must call it at the same point of its operation sequence, e.g. right after the
    step's all_reduce: readiness is agreed there, so all members see the same answer and either
    all of them call `recover_ranks` or none does."""
    rt = runtime_of(group)
    if len(rt.view.active) == rt.slots:
        return []
    # Only slots with a joiner in sight can be ready (get_peer_state is False for the others):
    # asking about every inactive slot of a 1024-slot group costs more than the step itself.
    waiting = [r for r in rt.joiner_slots() if not rt.view.is_active(r)]
    ready = [r for r, ok in zip(waiting, get_peer_state(group, waiting), strict=True) if ok]
    if not ready:
        return []
    result = recover_ranks(group, ready)
    if result.status == ProposalStatus.Rejected:
        return []
    return [r for r in ready if r not in result.dropped_ranks]


def get_num_synced_ranks(group: object | None = None) -> int:
    """Diagnostics: active ranks plus joiners every active member has seen ready."""
    rt = runtime_of(group)
    return len(rt.view.active) + rt.num_agreed_ready()


def extend_group_size_to(group: object | None, size: int,
                         timeout: float | None = None) -> ProposalResult:
    """Legacy scale-up (collective): activate every slot below `size`, waiting (bounded by
    `timeout`, default the group's) until a joiner is ready in each of them: processes that
    declared the larger world may still be starting when the members call this."""
    rt = runtime_of(group)
    if not 0 < size <= rt.slots:
        raise ValueError(f"cannot extend to {size} ranks: the group has {rt.slots} slots")
    wanted = [r for r in range(size) if not rt.view.is_active(r)]
    if wanted:
        rt.wait_ready(wanted, timeout)
    return activate_ranks(group, wanted)


def metrics(group: object | None = None) -> dict:
    """Local, no I/O: this rank's counters and gauges for `group` as plain data: `group`,
    `rank`, `phase`, `epoch`, `active_ranks`; per operation kind `operations`, `bytes` (of
    the tensor each call passed), `seconds` (total) and `last_op_seconds`; `last_op`;
    `peer_failures` by how each was noticed; `view_changes`, `op_timeouts`, `mismatches`,
    `rejected_connections` (data-plane connections that failed authentication)."""
    return runtime_of(group).metrics_snapshot()


def metrics_endpoint() -> tuple[str, int] | None:
    """(host, port) of this process's Prometheus endpoint (Options.metrics_port or
    $ELASTICPG_METRICS_PORT), None when none runs."""
    return prometheus.endpoint()
