"""Which peers share this host, and their mapped regions, for one group in one process.

Every rank publishes `shm/<rank>` in the group's store before its TCP endpoint, so a peer that
can reach it can also decide whether to use shared memory with it. A collective runs over
shared memory iff every participant published the same non-empty host id: the decision uses
only published facts, so all participants make the same one. Shared memory is the default; a
rank started with ELASTICPG_TRANSPORT=tcp publishes an empty host id and so keeps every
collective it takes part in on TCP.
A peer's region is mapped on first use and forgotten when that slot's membership changes, so a
replacement process (new pid, new region) is attached afresh.
"""

from __future__ import annotations

import os
import threading
import time
import weakref

import numpy as np
import torch

from ..control.group_store import GroupStore
from ..errors import OperationTimeoutError
from ..transport.shm import Region, host_id, window_bytes

# how long a region record that cannot be mapped may take to be replaced by a newer process's
STALE_WAIT = 2.0
SPIN_SECONDS = 200e-6  # spin this long before sleeping, when every local rank has a core
YIELD_SECONDS = 50e-6  # poll this long, yielding the core, when ranks outnumber cores


class ShmHost:
    def __init__(self, control: GroupStore, rank: int, slots: int) -> None:
        self.control = control
        self.rank = rank
        self.slots = slots
        self.host_id = host_id()
        self.window = window_bytes()
        self.cores = len(os.sched_getaffinity(0))
        self.mine: Region | None = Region.create(slots, self.window) if self.host_id else None
        self._hosts: dict[int, str] = {}
        self._peers: dict[int, Region] = {}
        self._sets: dict[tuple[int, ...], dict[int, Region]] = {}  # see regions_for
        self._lock = threading.Lock()
        self.last_buffer = 1  # the buffer of our latest post; posts alternate
        self._last_np: tuple | None = None  # see numpy_of

    def publish(self) -> None:
        info = "" if self.mine is None else (f"{self.host_id}|{os.getpid()}|{self.mine.fd}|"
                                             f"{self.mine.region_id}|{self.slots}|{self.window}")
        self.control.publish_shm(self.rank, info)

    def _info(self, peer: int, timeout: float) -> str:
        try:
            return self.control.shm_info(peer, timeout)
        except OperationTimeoutError:
            return ""

    def usable(self, participants: tuple[int, ...], timeout: float) -> bool:
        """True iff every participant published our (non-empty) host id."""
        if self.mine is None or len(participants) < 2:
            return False
        return all(self.host_of(p, timeout) == self.host_id for p in participants
                   if p != self.rank)

    def host_of(self, peer: int, timeout: float = 1.0) -> str:
        """The host id `peer` published ("" if unknown or off), looked up once."""
        host = self._hosts.get(peer)
        if host is None:
            host = self._info(peer, timeout).split("|", 1)[0]
            self._hosts[peer] = host
        return host

    def regions_for(self, participants: tuple[int, ...],
                    timeout: float) -> dict[int, Region] | None:
        """None unless the op can run over shared memory; else every peer's mapped region
        (a peer whose region cannot be mapped is absent: its process is gone).

        Remembered per participant set until a membership change, so that a serving loop pays
        for the lookups once, not on every collective."""
        known = self._sets.get(participants)
        if known is not None:
            return known
        if not self.usable(participants, timeout):
            return None
        regions = {}
        for p in participants:
            r = self.region(p, timeout) if p != self.rank else None
            if r is not None:
                regions[p] = r
        if len(regions) == len(participants) - 1:
            self._sets[participants] = regions
        return regions

    def numpy_of(self, t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """`t` as a flat numpy array and its bytes, remembered for the last tensor seen (a
        serving loop reduces the same buffer every step; making the views costs microseconds)."""
        c = self._last_np
        if (c is not None and c[0]() is t and c[1] == t.data_ptr() and c[2] == t.numel()
                and c[3] == t.dtype):
            return c[4], c[5]
        a = t.numpy().reshape(-1)
        a8 = a.view(np.uint8)
        self._last_np = (weakref.ref(t), t.data_ptr(), t.numel(), t.dtype, a, a8)
        return a, a8

    def spin_for(self, participants: tuple[int, ...]) -> float:
        """How to poll before sleeping (transport.shm.wait_for): spin when every participant
        has a core of its own; with more ranks than cores, poll briefly while yielding the core,
        which lets the rank we wait for run in our place instead of after a futex round trip."""
        return SPIN_SECONDS if len(participants) <= self.cores else -YIELD_SECONDS

    @staticmethod
    def _attach(info: str) -> Region | None:
        fields = info.split("|")
        if len(fields) != 6 or not fields[0]:
            return None
        _host, pid, fd, rid, slots, window = fields
        try:
            return Region.attach(int(pid), int(fd), int(rid), int(slots), int(window))
        except (OSError, ValueError):
            return None

    def region(self, peer: int, timeout: float, info: str | None = None) -> Region | None:
        """The peer's mapped region, or None if it cannot be mapped (its process is gone)."""
        r = self._peers.get(peer)
        if r is not None:
            return r
        read = self._info(peer, timeout) if info is None else info
        r = self._attach(read)
        if r is None and info is None and read:
            # The record may be an earlier process's (a group created again on the same
            # store, whose new process has not published yet): wait, bounded, for a newer one.
            until = time.monotonic() + min(timeout, STALE_WAIT)
            while r is None and time.monotonic() < until:
                time.sleep(0.02)  # the store cannot wait for a key to change: poll, bounded
                newer = self._info(peer, 0.001)
                if newer != read:
                    read, r = newer, self._attach(newer)
        if r is None:
            return None
        with self._lock:
            self._peers[peer] = r
        return r

    def prepare(self, peer: int, timeout: float) -> None:
        """Look the peer up and map its region now, before an operation needs it: a joiner's
        first collective must not pay for this (it would stall every member)."""
        if self.mine is None:
            return
        info = self._info(peer, timeout)
        self._hosts[peer] = info.split("|", 1)[0]
        if self._hosts[peer] == self.host_id:
            self.region(peer, timeout, info)

    def membership_changed(self) -> None:
        """The set of active slots changed: participant sets are looked up afresh."""
        self._sets.clear()

    def forget(self, peer: int) -> None:
        """`peer`'s process left the group: a later use looks its slot up (and maps) afresh."""
        self._sets.clear()
        with self._lock:
            self._hosts.pop(peer, None)
            r = self._peers.pop(peer, None)
        if r is not None:
            r.close()

    def forget_all(self) -> None:
        """This rank is (re)joining: any peer may be another process by now."""
        for peer in list(self._peers) + list(self._hosts):
            self.forget(peer)

    def wake_all(self) -> None:
        """Wake this process's sleepers (they re-check failures, aborts and closing)."""
        with self._lock:
            regions = list(self._peers.values())
        for r in regions:
            r.wake()
        if self.mine is not None:
            self.mine.wake()

    def close(self) -> None:
        self.wake_all()
        self._sets.clear()
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for r in peers:
            r.close()
        if self.mine is not None:
            self.mine.close()
            self.mine = None
