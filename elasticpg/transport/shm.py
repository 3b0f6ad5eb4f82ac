"""Same-host data plane: one shared-memory region per rank and group, read by its peers.

Each rank creates its region with memfd_create + mmap: there is no name to leak, and the kernel
frees the memory when the last process that maps it goes away (a SIGKILLed rank included).
Peers on the same host open it through /proc/<pid>/fd/<fd> (same uid needed, which is why the
uid is part of the host id). Only the owner writes its region, so no cross-process atomics
are needed: every control word has a single writer.

Layout (int64 words; control words of different writers never share a cache line):

  ctl[0..3]    magic, random region id (guards against pid reuse), slots, window bytes
  ctl[SLEEP]   1 + the slot whose bell the owner sleeps on, 0 while it is awake: a poster
               makes the wake-up system call only for a peer that sleeps on its bell
  ctl[BELL]    futex word (low 32 bits): bumped on every post, so readers can sleep on it
  per buffer b in (0, 1) (posts alternate between the two buffers):
    ctl[TOK+8b]      token of the round whose raw data is posted in buffer b (0: none/being
                     rewritten), then in the same cache line, ctl[TOK+8b+1 ..+7], the
                     descriptor: kind | dtype << 8 | redop << 16, numel, root, stream bytes,
                     ready mask, participants mask, view epoch (a reader that sees the token
                     has the descriptor without another cache-line transfer)
    ctl[RED+8b]      token of the round whose reduced slice is posted; ctl[RED+8b+1]: the set
                     of ranks (bitmask) that slice includes
    ctl[TABLE(b)..]  per destination slot: (stream offset, bytes) for all_to_all
  data: buffer b = raw window (W bytes) then reduced window (W bytes)
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..options import positive_env
from . import futex

MAGIC = 0x45504753484D0004  # "EPGSHM", version 4
SLEEP = 4
BELL = 8
TOK = 16  # then the descriptor (module docstring)
RED = 32
TABLE0 = 48
# Bytes per window. Every window is one synchronised round, so fewer, larger windows win even
# past the L2 size (measured: README, "Data planes"). A region holds four windows (16 MiB per
# rank and group).
DEFAULT_WINDOW = 4 << 20
_PAGE = 4096
_BYTE = np.dtype(np.uint8)


def host_id() -> str:
    """Ranks whose host ids are equal map each other's regions ("" if shm is off here).

    On by default on x86-64 Linux; ELASTICPG_TRANSPORT=tcp keeps this process's groups on TCP
    (for comparison, or where /proc/<pid>/fd of a peer is not readable). The protocol relies on
    x86's store order (data, then descriptor, then token, seen in that order by readers) and on
    its locked instructions as full fences; other architectures would need real barriers, which
    Python cannot issue, so they use TCP.
    """
    if os.environ.get("ELASTICPG_TRANSPORT", "").lower() == "tcp" or not futex.HAS_FENCE \
            or not hasattr(os, "memfd_create"):
        return ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        net = os.stat("/proc/self/ns/net")
    except OSError:
        return ""
    # The network namespace is part of the identity: namespaces share hostname, boot id and
    # uid, and ranks in different ones are different hosts to the group (their peers reach them
    # only over the network, as in the multi-host tests) even if they could map our memory.
    return f"{socket.gethostname()}/{boot}/{os.getuid()}/net:{net.st_dev}:{net.st_ino}"


def window_bytes() -> int:
    """The window size: $ELASTICPG_SHM_WINDOW bytes (rounded down to pages) or the default."""
    w = positive_env("ELASTICPG_SHM_WINDOW", "bytes", int)
    return DEFAULT_WINDOW if w is None else max(_PAGE, int(w) // _PAGE * _PAGE)


def _ctl_bytes(slots: int) -> int:
    return -(-(TABLE0 + 4 * slots) * 8 // _PAGE) * _PAGE


class Region:
    """One rank's mapping (its own or a peer's): control words and the two data buffers."""

    def __init__(self, mm: mmap.mmap, fd: int, slots: int, window: int) -> None:
        self.mm = mm
        self.fd = fd  # our own memfd (kept open for peers to open); -1 for a peer's region
        self.slots = slots
        self.window = window
        ctl_bytes = _ctl_bytes(slots)
        # Control words through a memoryview: indexing it yields plain ints, several times
        # cheaper than numpy scalars, and the latency path reads and writes them on every call.
        self._mv = memoryview(mm)
        self.ctl = self._mv[:ctl_bytes].cast("q")
        self.ctl_np = np.frombuffer(mm, dtype=np.int64, count=ctl_bytes // 8)  # bulk access
        self.bell32 = self._mv[:ctl_bytes].cast("i")  # the futex word is 32 bits
        self.bell_addr = self.ctl_np.ctypes.data + BELL * 8
        self.data = torch.frombuffer(mm, dtype=torch.uint8, offset=ctl_bytes,
                                     count=4 * window)
        # numpy views cost a fraction of torch's per call: the small-message path uses them
        self.np_data = np.frombuffer(mm, dtype=np.uint8, offset=ctl_bytes, count=4 * window)
        self._np_views: dict[tuple[int, np.dtype, int], np.ndarray] = {}  # see np_raw

    @classmethod
    def create(cls, slots: int, window: int) -> Region:
        size = _ctl_bytes(slots) + 4 * window
        fd = os.memfd_create("elasticpg", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        region = cls(mm, fd, slots, window)
        region.ctl[1] = secrets.randbits(62)
        region.ctl[2], region.ctl[3] = slots, window
        region.ctl[0] = MAGIC
        return region

    @classmethod
    def attach(cls, pid: int, fd: int, region_id: int, slots: int, window: int) -> Region:
        """Map a peer's region; raises OSError if it is gone or is not the one published."""
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            mm = mmap.mmap(own, _ctl_bytes(slots) + 4 * window)
        finally:
            os.close(own)  # the mmap keeps its own duplicate until it is closed
        region = cls(mm, -1, slots, window)
        if int(region.ctl[0]) != MAGIC or int(region.ctl[1]) != region_id:
            region.close()
            raise OSError(f"/proc/{pid}/fd/{fd} is not the published region")
        return region

    @property
    def region_id(self) -> int:
        return int(self.ctl[1])

    def newest_seq(self) -> int:
        """The collective sequence number of the newest post, -1 if none (tokens are
        seq << 20 | round + 1, so 0 means no post)."""
        newest = max(int(self.ctl[TOK]), int(self.ctl[TOK + 8]))
        return newest >> 20 if newest else -1

    def raw(self, b: int) -> torch.Tensor:
        return self.data[2 * b * self.window:(2 * b + 1) * self.window]

    def np_raw(self, b: int, count: int, dtype: np.dtype = _BYTE) -> np.ndarray:
        """The first `count` items of raw buffer b as a numpy array of `dtype`.

        Remembered per (buffer, dtype, count): a serving loop asks for the same few views on
        every call, and building one costs more than the small message it carries."""
        key = (b, dtype, count)
        view = self._np_views.get(key)
        if view is None:
            if len(self._np_views) > 64:
                self._np_views.clear()
            start = 2 * b * self.window
            view = self.np_data[start:start + count * dtype.itemsize].view(dtype)
            self._np_views[key] = view
        return view

    def raw_bytes(self, b: int, a: int, c: int) -> np.ndarray:
        """Bytes [a, c) of raw buffer b, as a numpy array (cheaper to make than a tensor)."""
        start = 2 * b * self.window
        return self.np_data[start + a:start + c]

    def reduced(self, b: int) -> torch.Tensor:
        return self.data[(2 * b + 1) * self.window:(2 * b + 2) * self.window]

    def table(self, b: int) -> np.ndarray:
        base = TABLE0 + b * 2 * self.slots
        return self.ctl_np[base:base + 2 * self.slots]

    def ring(self, me: int, readers: Iterable[Region]) -> None:
        """Bump the bell after a change readers may wait for; wake the ones asleep on it.

        Lost wake-ups are impossible: a sleeper publishes SLEEP before it reads the bell (the
        futex call re-reads it in the kernel, behind a full barrier), and we bump the bell, fence,
        then read SLEEP, so one of the two sees the other's write."""
        self.bell32[2 * BELL] = (self.bell32[2 * BELL] + 1) & 0x7FFFFFFF
        futex.fence()
        tag = me + 1
        for r in readers:
            if r.ctl[SLEEP] == tag:
                futex.wake(self.bell_addr)
                return

    def wake(self) -> None:
        futex.wake(self.bell_addr)

    def close(self) -> None:
        """Unmap (once no tensor views of it remain; otherwise the GC unmaps it later)."""
        views = (self.ctl, self.bell32, self._mv)
        self._np_views.clear()
        del self.ctl, self.bell32, self._mv, self.ctl_np, self.data, self.np_data
        try:
            for v in views:
                v.release()
            self.mm.close()
        except BufferError:
            pass  # a view is still alive in some frame; dropping the last reference unmaps
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def wait_for(region: Region, cond: Callable[[], bool], check: Callable[[], None],
             deadline: float, spin: float, mine: Region, peer: int,
             slice_s: float = 0.1) -> None:
    """Return once `cond()` holds: spin for `spin` seconds (or, if `spin` < 0, poll for -spin
    seconds with sched_yield between polls), then sleep on `region`'s bell (`region` is slot
    `peer`'s; `mine`, our own, tells the peer we sleep on it: see ring).

    `check()` raises when waiting is pointless (peer failed, abort, group closed); it runs
    before every sleep, and every failure, abort and close wakes the sleepers, so it runs at
    once. The slice bounds each sleep as a safety net. Raises TimeoutError past `deadline`.
    """
    if cond():
        return
    if spin > 0:
        end = time.perf_counter() + spin
        while time.perf_counter() < end:
            if cond():
                return
    elif spin < 0:  # more ranks than cores: poll, but hand our core to a runnable rank each time
        end = time.perf_counter() - spin
        while time.perf_counter() < end:
            os.sched_yield()
            if cond():
                return
    bell32, addr = region.bell32, region.bell_addr
    mine.ctl[SLEEP] = peer + 1
    try:
        while True:
            futex.fence()
            seen = bell32[2 * BELL]
            if cond():
                return
            check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            futex.wait(addr, seen, min(left, slice_s))
    finally:
        mine.ctl[SLEEP] = 0
