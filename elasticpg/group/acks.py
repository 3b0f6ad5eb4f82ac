"""Acknowledgements of point-to-point messages, sent off the reader threads.

A send completes only when the receiving process has the whole message (SPEC: a send to a
rank that has gone must not report success because its bytes fit in a socket buffer). The
receiver's reader thread must never block on a write of its own (two readers each blocked
writing to the other would deadlock two ranks streaming to each other), so it only queues the
acknowledgement; one thread per group writes them.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("elasticpg.acks")

_STOP = (-1, -1)


class Acker:
    def __init__(self, name: str, send: Callable[[int, int], None]) -> None:
        self._send = send  # send(peer, seq): write one acknowledgement, bounded
        self._name = name
        self._queue: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def submit(self, peer: int, seq: int) -> None:
        with self._lock:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name=self._name)
                self._thread.start()
        self._queue.put((peer, seq))

    def _run(self) -> None:
        while True:
            peer, seq = self._queue.get()
            if (peer, seq) == _STOP:
                return
            self._send(peer, seq)

    def stop(self, timeout: float = 1.0) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout)
