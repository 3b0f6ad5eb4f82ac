"""The store every worker of a run rendezvouses on: hosted by the launcher, or external.

* no `--store`: a standalone TCPStore in the launcher process, on 127.0.0.1 (one node). No
  worker hosts it, so it outlives every worker's death, rank 0's included.
* `--store HOST:PORT` (or `tcp://HOST:PORT`): an external TCPStore that every node's launcher
  points its workers at; the launcher checks that it answers before starting anyone.
* `--store etcd://...`: parsed here, rejected in `store_for_workers` -- that is the one place
  where an etcd-backed store would be set up for the workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from ..cli.launching import HOST, listen_store

SCHEMES = ("tcp", "etcd")


class LaunchError(RuntimeError):
    """The launcher cannot run the job (not a worker's failure)."""


@dataclass(frozen=True)
class StoreSpec:
    scheme: str  # one of SCHEMES
    endpoints: tuple[tuple[str, int], ...]  # etcd may name several members

    def __str__(self) -> str:
        return f"{self.scheme}://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)


def _endpoint(text: str, whole: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # [::1]:29500
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad store address {whole!r}: expected HOST:PORT with a port in "
                         f"1..65535 (or tcp://HOST:PORT, etcd://HOST:PORT[,HOST:PORT...])")
    return host, int(port)


def parse_store(text: str) -> StoreSpec:
    """`HOST:PORT`, `tcp://HOST:PORT` or `etcd://HOST:PORT[,HOST:PORT...]`."""
    scheme, rest = "tcp", text.strip()
    if "://" in rest:
        parts = urlsplit(rest)
        scheme, rest = parts.scheme.lower(), parts.netloc
        if scheme not in SCHEMES:
            raise ValueError(f"unknown store scheme {parts.scheme!r} in {text!r}; choose from "
                             f"{', '.join(SCHEMES)}")
        if parts.path not in ("", "/"):
            raise ValueError(f"bad store address {text!r}: no path expected after the host")
    endpoints = tuple(_endpoint(e, text) for e in rest.split(",")) if rest else ()
    if not endpoints:
        raise ValueError(f"bad store address {text!r}: no HOST:PORT given")
    if scheme == "tcp" and len(endpoints) != 1:
        raise ValueError(f"a TCPStore has one address, got {len(endpoints)} in {text!r}")
    return StoreSpec(scheme, endpoints)


@contextmanager
def store_for_workers(spec: StoreSpec | None, world_size: int,
                      timeout: float) -> Iterator[tuple[str, int]]:
    """(MASTER_ADDR, MASTER_PORT) for the workers, valid inside the block. Hosts a TCPStore in
    this process when `spec` is None; checks an external one answers within `timeout`."""
    import torch.distributed as dist

    if spec is None:
        store, port = listen_store(world_size, timeout)
        try:
            yield HOST, port
        finally:
            del store
        return
    if spec.scheme == "etcd":
        # Here an etcd-backed store would be handed to the workers (they cannot reach it
        # through torch's env:// rendezvous, which speaks TCPStore only).
        raise LaunchError(f"--store {spec}: etcd stores are not supported by elasticpg run "
                          f"yet; use a TCPStore (HOST:PORT)")
    (host, port), = spec.endpoints
    try:
        probe = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout),
                              wait_for_workers=False)
    except (RuntimeError, OSError) as exc:  # DistStoreError derives from RuntimeError
        raise LaunchError(f"--store {host}:{port} did not answer within {timeout:g} s: "
                          f"{exc}") from None
    del probe
    yield host, port
