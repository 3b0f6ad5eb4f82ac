"""Several "hosts" on one Linux machine: network namespaces joined by veth links to a bridge.

Layout for a run with prefix P and n hosts (all names unique to the run, so concurrent runs
and a crashed earlier run never collide):

    namespace P-sw : bridge "sw" at 198.18.0.1/24 (the store listens here), ports "p<i>"
    namespace P-h<i>: "eth0" at 198.18.0.<11+i>/24, the other end of port p<i>; lo up

Every address is in 198.18.0.0/15 (reserved for benchmarks, RFC 2544) and exists only inside
these namespaces, so nothing here can reach or disturb a real network. Interfaces are created
directly inside their namespaces: no name is ever taken in the caller's namespace.

`Topology.remove` deletes the namespaces (which deletes their interfaces) and is safe to call
after a partial `create`; `leftovers(prefix)` lists what of a run still exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

SUBNET = "198.18.0"
SWITCH_ADDR = f"{SUBNET}.1"
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"

T = TypeVar("T")


class TopologyError(RuntimeError):
    """An `ip` command failed while building or changing the namespaces."""


def unavailable() -> str:
    """Why namespaces cannot be made here ("" if they can): not Linux, not root, no `ip`."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise TopologyError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def namespaces() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leftovers(prefix: str) -> list[str]:
    """Namespaces of the run `prefix` that still exist."""
    return [n for n in namespaces() if n.startswith(prefix + "-")]


@dataclass
class Topology:
    prefix: str
    hosts: int
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def host(self, i: int) -> str:
        """The namespace name of host i."""
        return f"{self.prefix}-h{i}"

    def addr(self, i: int) -> str:
        """Host i's address (on its eth0)."""
        return f"{SUBNET}.{11 + i}"

    def create(self) -> Topology:
        """Build everything; on any error remove what was built and raise."""
        if self.hosts > 200:
            raise ValueError("at most 200 hosts fit the /24")
        try:
            self._add_ns(self.switch)
            sw = self.switch
            _ip("-n", sw, "link", "add", "sw", "type", "bridge")
            _ip("-n", sw, "addr", "add", f"{SWITCH_ADDR}/24", "dev", "sw")
            _ip("-n", sw, "link", "set", "sw", "up")
            for i in range(self.hosts):
                ns = self.host(i)
                self._add_ns(ns)
                _ip("link", "add", "eth0", "netns", ns, "type", "veth",
                    "peer", "name", f"p{i}", "netns", sw)
                _ip("-n", sw, "link", "set", f"p{i}", "master", "sw")
                _ip("-n", sw, "link", "set", f"p{i}", "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def remove(self) -> list[str]:
        """Delete every namespace this run made; returns the errors (empty when clean)."""
        errors = []
        for name in reversed(self.created):
            res = _ip("netns", "del", name, check=False)
            if res.returncode != 0 and name in namespaces():
                errors.append(f"{name}: {res.stderr.strip()}")
        self.created = [n for n in self.created if n in namespaces()]
        return errors

    def set_link(self, i: int, up: bool) -> None:
        """Bring host i's link to the switch down or up (its port on the bridge)."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "up" if up else "down")

    def exec_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program on host i."""
        return ["ip", "netns", "exec", self.host(i)]


@contextlib.contextmanager
def _entered(name: str) -> Iterator[None]:
    """The calling thread in namespace `name` (setns affects only the calling thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(_NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
        yield
    finally:
        os.close(fd)


def in_namespace(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread that entered namespace `name`; sockets it opens live there (and
    keep working from any thread afterwards). This process's own threads stay where they are.
    """
    box: dict[str, object] = {}

    def body() -> None:
        try:
            with _entered(name):
                box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join(60)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    if "value" not in box:
        raise TimeoutError(f"entering namespace {name} did not finish")
    return box["value"]  # type: ignore[return-value]
