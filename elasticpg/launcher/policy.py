"""Per-slot supervision and the restart policy: a pure decision table, no processes, no clock.

The process shell (`supervisor.py`) reports what happened (a worker exited with a status, a
signal arrived, time passed) and carries out what this module decides. Everything here is
deterministic in its inputs, so every rule is unit-tested in-process.

A slot's worker that exits:

| launcher stopping? | exit status | restarts left? | live peer to join? | decision           |
|--------------------|-------------|----------------|--------------------|--------------------|
| yes                | any         | -              | -                  | STOPPED            |
| no                 | 0           | -              | -                  | FINISHED           |
| no                 | not 0       | yes            | yes                | RESTART (backoff)  |
| no                 | not 0       | no             | -                  | GIVE_UP (limit)    |
| no                 | not 0       | yes            | no                 | GIVE_UP (alone)    |

then, after a GIVE_UP: fewer than `min_workers` slots left that are not given up -> TOO_FEW
(the launcher stops every other worker). "Live peer to join": another of this launcher's slots
is running, or there are other nodes (`peers_elsewhere`), whose state a launcher cannot see;
a replacement with nobody to join would wait out its join timeout. The same check is made
again when a slot's backoff ends.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field


class ExitCode(enum.IntEnum):
    """What `elasticpg run`'s exit status says. Interrupted runs exit 128 + the signal's number
    (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process killed by it."""

    FINISHED = 0  # every slot's worker finished with status 0 (possibly after restarts)
    LAUNCH_ERROR = 1  # the launcher could not run the job (e.g. the store is unreachable)
    USAGE = 2  # bad command line
    GAVE_UP = 3  # at least one slot was given up on; the others finished
    TOO_FEW = 4  # giving up left fewer than --min-workers slots: the rest were stopped


INTERRUPTED_BASE = 128


class SlotStatus(enum.Enum):
    PENDING = "pending"  # to be started (first start, or restart after its backoff)
    RUNNING = "running"
    FINISHED = "finished"  # its worker exited with status 0
    GIVEN_UP = "given up"
    STOPPED = "stopped"  # ended by the launcher (interrupt, too few workers left)


class Decision(enum.Enum):
    START = "start"  # start (or restart) this slot's worker now
    FINISHED = "finished"
    RESTART = "restart"
    GIVE_UP = "give up"
    TOO_FEW = "too few"  # gave up on this slot, and that leaves too few: stop everything
    STOPPED = "stopped"


@dataclass(frozen=True)
class RestartPolicy:
    """At most `max_restarts` restarts per slot; the n-th waits delay * 2**(n-1), capped."""

    max_restarts: int = 3
    delay: float = 1.0
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.delay >= 0 or not self.max_delay >= 0:
            raise ValueError(f"restart delays must be >= 0, got {self.delay}, {self.max_delay}")

    def delay_before(self, restart: int) -> float:
        """Seconds to wait before restart number `restart` (1-based)."""
        return min(self.delay * 2 ** (restart - 1), max(self.max_delay, self.delay))


def describe_status(returncode: int) -> str:
    """A worker's exit as a person reads it ("exit status 3", "killed by SIGKILL")."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass
class Slot:
    rank: int
    local_rank: int
    status: SlotStatus = SlotStatus.PENDING
    restarts: int = 0  # replacements started (or due) in this slot
    exits: list[int] = field(default_factory=list)  # return codes; negative: killed by signal
    start_at: float = 0.0  # when PENDING: not before this time
    reason: str = ""  # why it was given up on / stopped


@dataclass(frozen=True)
class Outcome:
    """One exit event decided: what to do, and the words for it."""

    slot: Slot
    decision: Decision
    message: str
    delay: float = 0.0


class Supervision:
    """The slots of one launcher and the rules that move them."""

    def __init__(self, ranks: Sequence[int], policy: RestartPolicy, min_workers: int = 1,
                 peers_elsewhere: bool = False) -> None:
        if not 0 <= min_workers <= len(ranks):
            raise ValueError(f"min_workers must be between 0 and {len(ranks)} (this launcher's "
                             f"workers), got {min_workers}")
        self.slots = [Slot(rank, i) for i, rank in enumerate(ranks)]
        self.policy = policy
        self.min_workers = min_workers
        self.peers_elsewhere = peers_elsewhere
        self.stop_reason: str | None = None  # set once the launcher is stopping
        self.interrupted_by: int | None = None  # the signal that interrupted the run
        self.too_few = False

    # ---- events -------------------------------------------------------------------------------
    def due(self, now: float) -> list[Outcome]:
        """Slots whose (re)start is due: START (the slot is RUNNING from now on), or, for a
        restart whose slot has nobody left to join, GIVE_UP / TOO_FEW (the replacement would
        only wait out its join timeout)."""
        out = []
        for slot in self.slots:
            if slot.status != SlotStatus.PENDING or slot.start_at > now:
                continue
            if slot.restarts and not self._live_peer(slot):
                out.append(self._give_up(slot, "no other rank is left to join"))
                continue
            slot.status = SlotStatus.RUNNING
            what = (f"restart {slot.restarts} of {self.policy.max_restarts}, as a replacement"
                    if slot.restarts else "first start")
            out.append(Outcome(slot, Decision.START, f"rank {slot.rank} ({what})"))
        return out

    def exited(self, local_rank: int, returncode: int, now: float) -> Outcome:
        """The worker of slot `local_rank` exited with `returncode` (negative: signal)."""
        slot = self.slots[local_rank]
        if slot.status != SlotStatus.RUNNING:
            raise ValueError(f"rank {slot.rank} has no running worker ({slot.status.value})")
        slot.exits.append(returncode)
        how = describe_status(returncode)
        if self.stop_reason is not None:
            slot.status, slot.reason = SlotStatus.STOPPED, self.stop_reason
            return Outcome(slot, Decision.STOPPED, f"rank {slot.rank} ended ({how})")
        if returncode == 0:
            slot.status = SlotStatus.FINISHED
            return Outcome(slot, Decision.FINISHED, f"rank {slot.rank} finished")
        if slot.restarts >= self.policy.max_restarts:
            limit = self.policy.max_restarts
            return self._give_up(slot, f"{how} after {limit} restart{'s' * (limit != 1)} "
                                       f"(--max-restarts {limit})")
        if not self._live_peer(slot):
            return self._give_up(slot, f"{how}, and no other rank is left to join")
        slot.restarts += 1
        delay = self.policy.delay_before(slot.restarts)
        slot.status, slot.start_at = SlotStatus.PENDING, now + delay
        return Outcome(slot, Decision.RESTART,
                       f"rank {slot.rank} {how}; restarting it as a replacement in {delay:g} s "
                       f"(restart {slot.restarts} of {self.policy.max_restarts})", delay)

    def interrupt(self, signum: int) -> bool:
        """A signal asks the run to end. True the first time (forward it and wait a grace
        period), False afterwards (the shell escalates)."""
        if self.interrupted_by is not None:
            return False
        self.interrupted_by = signum
        self._stop(f"interrupted by {signal.Signals(signum).name}")
        return True

    # ---- what the shell asks ------------------------------------------------------------------
    def next_start(self) -> float | None:
        """The earliest time a pending slot is due, or None."""
        times = [s.start_at for s in self.slots if s.status == SlotStatus.PENDING]
        return min(times) if times else None

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.status == SlotStatus.RUNNING]

    def done(self) -> bool:
        return all(s.status not in (SlotStatus.PENDING, SlotStatus.RUNNING) for s in self.slots)

    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return INTERRUPTED_BASE + self.interrupted_by
        if self.too_few:
            return ExitCode.TOO_FEW
        if any(s.status == SlotStatus.GIVEN_UP for s in self.slots):
            return ExitCode.GAVE_UP
        return ExitCode.FINISHED

    def summary(self) -> list[str]:
        """One line for the run and one per slot: what happened, restarts, every exit."""
        total = sum(s.restarts for s in self.slots)
        lines = [f"{len(self.slots)} rank{'s' * (len(self.slots) != 1)}, {total} "
                 f"restart{'s' * (total != 1)}; exit {self.exit_code()} "
                 f"({self._exit_words()})"]
        for s in self.slots:
            what = s.status.value + (f": {s.reason}" if s.reason else "")
            exits = ", ".join(describe_status(c) for c in s.exits) or "none"
            lines.append(f"rank {s.rank}: {what}; {s.restarts} restart"
                         f"{'s' * (s.restarts != 1)}; exits: {exits}")
        return lines

    # ---- rules --------------------------------------------------------------------------------
    def _live_peer(self, slot: Slot) -> bool:
        return self.peers_elsewhere or any(
            s is not slot and s.status == SlotStatus.RUNNING for s in self.slots)

    def _give_up(self, slot: Slot, why: str) -> Outcome:
        slot.status, slot.reason = SlotStatus.GIVEN_UP, why
        message = f"giving up on rank {slot.rank}: {why}"
        left = sum(s.status != SlotStatus.GIVEN_UP for s in self.slots)
        if left < self.min_workers and self.stop_reason is None:
            self.too_few = True
            self._stop(f"only {left} of {len(self.slots)} ranks left, fewer than "
                       f"--min-workers {self.min_workers}")
            return Outcome(slot, Decision.TOO_FEW, f"{message}; {self.stop_reason}: "
                                                   f"stopping the others")
        return Outcome(slot, Decision.GIVE_UP, message)

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        for s in self.slots:
            if s.status == SlotStatus.PENDING:
                s.status, s.reason = SlotStatus.STOPPED, reason

    def _exit_words(self) -> str:
        code = self.exit_code()
        if self.interrupted_by is not None:
            return self.stop_reason or "interrupted"
        return {ExitCode.FINISHED: "all finished", ExitCode.GAVE_UP: "gave up on a slot",
                ExitCode.TOO_FEW: "too few ranks left"}[ExitCode(code)]
