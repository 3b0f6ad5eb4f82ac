"""Futex wait/wake on a 32-bit word in shared memory, through ctypes.

A waiter on the shared-memory data plane must not burn a core while the rank it waits for
needs that core (ranks can outnumber cores): after a short spin it sleeps in the kernel until
the word changes. The futexes are shared (no FUTEX_PRIVATE_FLAG) because the word lives in a
mapping that other processes write. ctypes releases the GIL around the call, so the TCP reader
and liveness threads run while an operation sleeps here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_WAKE_ALL = 0x7FFFFFFF

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


AVAILABLE = _SYS_FUTEX is not None
# x86 orders every memory access around a locked instruction, which an uncontended lock's
# acquire and release each execute: that is the full barrier `fence` needs. Elsewhere there is
# none, and shared memory stays off (transport.shm.host_id).
HAS_FENCE = AVAILABLE and os.uname().machine in ("x86_64", "AMD64")
_fence_lock = threading.Lock()


def fence() -> None:
    """Full memory barrier (x86): our earlier stores are visible before our later loads."""
    _fence_lock.acquire()
    _fence_lock.release()


def wait(addr: int, expected: int, timeout: float) -> None:
    """Sleep while the 32-bit word at `addr` equals `expected`, at most `timeout` seconds.

    Returns on a wake, a changed word, a signal or the timeout: callers always re-check their
    condition, so the reason does not matter.
    """
    timeout = max(timeout, 0.0)
    ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
    _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_int(expected),
             ctypes.byref(ts), None, 0)


def wake(addr: int) -> None:
    """Wake every process sleeping on the word at `addr` (cheap when nobody sleeps)."""
    _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, _WAKE_ALL, None, None, 0)
