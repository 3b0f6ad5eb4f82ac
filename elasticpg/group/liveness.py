"""The liveness thread of one group: the bound on noticing a hung or cut-off peer.

Every tick (`heartbeat_interval`) it waits for an outgoing link to close (peers never write on
our outgoing links, so EOF there means the peer is gone even if it never linked to us), sends
heartbeats on idle links, reports peers that stopped reading or stayed silent for longer than
`failure_timeout`, and reads `view/latest` once, for decisions no VIEW frame brought (the
decider may be the very peer we were cut off from).

A rank that was stalled itself (SIGSTOP, overload) forgives the silence it observed instead of
accusing everyone. A tick that raises is logged and the loop goes on: one bad tick must not end
hang detection for the life of the group.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime import GroupRuntime

log = logging.getLogger("elasticpg.liveness")


class Liveness:
    def __init__(self, runtime: GroupRuntime) -> None:
        self.rt = runtime
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"elasticpg-liveness-r{runtime.rank}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.rt.transport.interrupt()  # its wait for closed links ends now
        if self.thread is not threading.current_thread() and self.thread.is_alive():
            self.thread.join(timeout=5.0)

    def _run(self) -> None:
        rt = self.rt
        last = time.monotonic()
        while not self.stopped.is_set():
            try:
                last = self._tick(last)
            except Exception:  # noqa: BLE001 - keep detecting hangs; the log says what broke
                log.exception("rank %d group %r: liveness tick failed", rt.rank, rt.group_id)
                self.stopped.wait(rt.heartbeat_interval)

    def _tick(self, last: float) -> float:
        rt = self.rt
        bound, tick = rt.failure_timeout, rt.heartbeat_interval
        for peer, sock in rt.transport.closed_outgoing(tick):
            rt.link_broke(peer, "connection closed", how="eof", sock=sock)
        if self.stopped.is_set():
            return last
        now = time.monotonic()
        if now - last > bound / 2:
            rt.transport.forgive_silence()  # we were stalled: nobody's silence is evidence
        for peer, sock in rt.transport.heartbeat(tick, bound):
            rt.link_broke(peer, f"stopped reading: nothing taken for {bound:.2f}s",
                          how="stopped_reading", sock=sock)
        for peer in rt.transport.silent(bound):
            rt.fail_peer(peer, f"no heartbeat for more than {bound:.2f}s (hung?)",
                         how="silence")
        rt.poll_decisions()
        return now
