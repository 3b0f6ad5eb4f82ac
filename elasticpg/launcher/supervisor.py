"""The process shell of `elasticpg run`: starts workers, watches them, carries out the policy.

One thread does everything: a selector waits on the workers' output pipes and on a
self-pipe that every signal writes to (`signal.set_wakeup_fd`; SIGCHLD included, so a worker's
death wakes the loop at once), with a timeout only for the next scheduled restart or the end
of a grace period. The decisions are `policy.Supervision`'s; this module only does the I/O.

How nothing is left behind:

* every worker runs in a process group (session) of its own, with PR_SET_PDEATHSIG = SIGKILL:
  if the launcher dies, even by SIGKILL, the kernel kills its workers;
* when a worker exits, whatever it left running in its process group is SIGKILLed before the
  worker is reaped (so the group id cannot have been reused);
* Ctrl-C / SIGTERM is forwarded to every worker's process group; whoever still runs after
  `--grace-period` is SIGKILLed; a second signal SIGKILLs at once;
* on any way out of the loop, an error included, every remaining worker is SIGKILLed and
  reaped.

Ctrl-C in a terminal reaches only the launcher (the workers are not in the terminal's
foreground group), so each worker gets the signal exactly once, from the launcher.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO

from ..cli.launching import die_with_parent_hook
from .config import LaunchConfig
from .environment import WorkerStore, worker_env
from .output import PrefixedLines, prefix_for
from .policy import Decision, Outcome, SlotStatus, Supervision

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DRAIN_BOUND = 2.0  # seconds to collect output still in the pipes after the last worker exited
NOT_STARTED = 127  # the exit status a worker that could not be started is recorded with


@dataclass
class _Worker:
    local_rank: int
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class _Stream:
    pipe: IO[bytes]
    sink: IO[bytes]
    lines: PrefixedLines


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty already


class Supervisor:
    def __init__(self, config: LaunchConfig, store: WorkerStore,
                 stdout: IO[bytes] | None = None, stderr: IO[bytes] | None = None) -> None:
        self.config = config
        self.store = store
        self.slots = config.slots()
        self.sup = Supervision([s.rank for s in self.slots], config.policy, config.min_workers,
                               peers_elsewhere=config.nnodes > 1)
        self.stdout = stdout or sys.stdout.buffer
        self.stderr = stderr or sys.stderr.buffer
        self.sel = selectors.DefaultSelector()
        self.workers: dict[int, _Worker] = {}  # local rank -> its running worker
        self.signals: list[int] = []
        self.kill_at: float | None = None  # end of the grace period, once stopping
        self.stopping = False
        self.preexec = die_with_parent_hook()

    def say(self, message: str) -> None:
        self.stderr.write(f"elasticpg run: {message}\n".encode())
        self.stderr.flush()

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(wake_r, selectors.EVENT_READ, None)
        handled = (*STOP_SIGNALS, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        previous_fd = signal.set_wakeup_fd(wake_w)
        try:
            self._loop(wake_r)
        finally:
            self.sel.unregister(wake_r)
            self._kill_all()
            self._drain()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sel.close()
            os.close(wake_r)
            os.close(wake_w)
        for line in self.sup.summary():
            self.say(line)
        return self.sup.exit_code()

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:  # SIGCHLD only wakes the loop (through the wakeup fd)
            self.signals.append(signum)

    def _loop(self, wake_fd: int) -> None:
        while True:
            now = time.monotonic()
            self._take_signals()
            self._reap(now)
            for outcome in self.sup.due(now):
                if outcome.decision == Decision.START:
                    self._start(outcome, now)
                else:
                    self._report(outcome)
            self._enforce_stop(now)
            if self.sup.done() and not self.workers:
                return
            wake = [t for t in (self.sup.next_start(), self.kill_at) if t is not None]
            timeout = max(0.0, min(wake) - time.monotonic()) if wake else None
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    while True:  # drain the wakeup bytes; the signals are in self.signals
                        try:
                            if not os.read(wake_fd, 512):
                                break
                        except BlockingIOError:
                            break
                else:
                    self._read(key.fileobj, key.data)  # type: ignore[arg-type]

    # ---- workers ------------------------------------------------------------------------------
    def _start(self, outcome: Outcome, now: float) -> None:
        slot = self.slots[outcome.slot.local_rank]
        restarts = outcome.slot.restarts
        env = worker_env(slot, restarts, self.store, self.config.run_id,
                         self.config.policy.max_restarts)
        try:
            proc = subprocess.Popen(self.config.command, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, preexec_fn=self.preexec)
        except OSError as exc:
            self.say(f"{outcome.message}: could not start {self.config.command[0]!r}: {exc}")
            self._report(self.sup.exited(slot.local_rank, NOT_STARTED, now))
            return
        self.workers[slot.local_rank] = _Worker(slot.local_rank, proc)
        prefix = prefix_for(slot.rank, restarts)
        for pipe, sink in ((proc.stdout, self.stdout), (proc.stderr, self.stderr)):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
            self.sel.register(pipe, selectors.EVENT_READ, _Stream(pipe, sink,
                                                                  PrefixedLines(prefix)))
        self.say(f"{outcome.message}: pid {proc.pid}")

    def _reap(self, now: float) -> None:
        for local_rank, worker in list(self.workers.items()):
            # WNOWAIT: see the exit but leave the zombie, so that its pid (= its process group
            # id) cannot be reused while we kill what it left in its group
            try:
                info = os.waitid(os.P_PID, worker.pid,
                                 os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = True  # already reaped (cannot happen unless someone else waited)
            if info is None:
                continue
            _killpg(worker.pid, signal.SIGKILL)
            returncode = worker.proc.wait()
            del self.workers[local_rank]
            self._report(self.sup.exited(local_rank, returncode, now))

    def _report(self, outcome: Outcome) -> None:
        if outcome.decision == Decision.GIVE_UP:
            left = sum(s.status != SlotStatus.GIVEN_UP for s in self.sup.slots)
            self.say(f"{outcome.message}; the run goes on without it ({left} of "
                     f"{len(self.slots)} ranks left on this node)")
        else:
            self.say(outcome.message)

    # ---- stopping -----------------------------------------------------------------------------
    def _take_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if self.sup.interrupt(signum):
                self.say(f"{signal.Signals(signum).name}: forwarding it to every worker; "
                         f"SIGKILL after {self.config.grace_period:g} s")
                self._begin_stop(signum)
            else:
                self.say(f"{signal.Signals(signum).name} again: killing every worker now")
                self._kill_running()

    def _enforce_stop(self, now: float) -> None:
        if self.sup.stop_reason is not None and not self.stopping:
            self._begin_stop(signal.SIGTERM)  # too few ranks left: end the others
        if self.kill_at is not None and now >= self.kill_at and self.workers:
            self.say(f"grace period over: SIGKILL to {len(self.workers)} worker(s) still "
                     f"running")
            self._kill_running()
            self.kill_at = None

    def _begin_stop(self, signum: int) -> None:
        self.stopping = True
        self.kill_at = time.monotonic() + self.config.grace_period
        for worker in self.workers.values():
            _killpg(worker.pid, signum)

    def _kill_running(self) -> None:
        for worker in self.workers.values():
            _killpg(worker.pid, signal.SIGKILL)

    def _kill_all(self) -> None:
        """The way out, whatever happened: nothing of ours keeps running."""
        for worker in self.workers.values():
            _killpg(worker.pid, signal.SIGKILL)
            worker.proc.kill()
        for worker in self.workers.values():
            worker.proc.wait()
        self.workers.clear()

    # ---- output -------------------------------------------------------------------------------
    def _read(self, pipe: IO[bytes], stream: _Stream) -> None:
        try:
            data = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return
        if data:
            stream.sink.write(stream.lines.feed(data))
        else:
            stream.sink.write(stream.lines.close())
            self.sel.unregister(pipe)
            pipe.close()
        stream.sink.flush()

    def _drain(self) -> None:
        """Output still in the pipes of exited workers, within a bound (a process that left
        its group could hold a pipe open forever)."""
        deadline = time.monotonic() + DRAIN_BOUND
        while True:
            left = deadline - time.monotonic()
            if not self.sel.get_map() or left <= 0:
                break
            for key, _ in self.sel.select(left):
                self._read(key.fileobj, key.data)  # type: ignore[arg-type]
        for key in list(self.sel.get_map().values()):
            key.data.sink.write(key.data.lines.close())
            key.data.sink.flush()
            self.sel.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
