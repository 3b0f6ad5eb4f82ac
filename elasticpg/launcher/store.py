"""The store every worker of a run rendezvouses on: hosted by the launcher, or external.

* no `--store`: a standalone TCPStore in the launcher process, on 127.0.0.1 (one node). No
  worker hosts it, so it outlives every worker's death, rank 0's included.
* `--store HOST:PORT` (or `tcp://HOST:PORT`): an external TCPStore (e.g. `elasticpg
  store-server`) that every node's launcher points its workers at; the launcher checks that it
  answers before starting anyone.
* `--store etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`: an etcd cluster (control/etcd_store.py),
  the job's keys under PREFIX (default: one named after the run id). The launcher claims its
  node's place under the prefix first (`elasticpg-run/node/<I>`, counted with `add`): a prefix
  that an earlier run's launcher for this node already used is refused, because that run's
  views would be taken for this one's. Workers get the URL as $ELASTICPG_INIT_METHOD.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from urllib.parse import urlsplit

from ..cli.launching import HOST, listen_store
from .environment import WorkerStore

SCHEMES = ("tcp", "etcd")
NODE_KEY = "elasticpg-run/node/{}"  # the launchers' own key under an etcd prefix


class LaunchError(RuntimeError):
    """The launcher cannot run the job (not a worker's failure)."""


@dataclass(frozen=True)
class StoreSpec:
    scheme: str  # one of SCHEMES
    endpoints: tuple[tuple[str, int], ...]  # etcd may name several members
    prefix: str = ""  # etcd: the job's key prefix ("": not named, see `with_prefix`)

    def __str__(self) -> str:
        where = f"{self.scheme}://" + ",".join(
            f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return where + (f"/{self.prefix}" if self.prefix else "")


def _endpoint(text: str, whole: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # [::1]:29500
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad store address {whole!r}: expected HOST:PORT with a port in "
                         f"1..65535 (or tcp://HOST:PORT, etcd://HOST:PORT[,HOST:PORT...])")
    return host, int(port)


def parse_store(text: str) -> StoreSpec:
    """`HOST:PORT`, `tcp://HOST:PORT` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`."""
    scheme, rest, prefix = "tcp", text.strip(), ""
    if "://" in rest:
        parts = urlsplit(rest)
        scheme, rest = parts.scheme.lower(), parts.netloc
        if scheme not in SCHEMES:
            raise ValueError(f"unknown store scheme {parts.scheme!r} in {text!r}; choose from "
                             f"{', '.join(SCHEMES)}")
        if scheme == "etcd":
            prefix = parts.path.strip("/")
        elif parts.path not in ("", "/"):
            raise ValueError(f"bad store address {text!r}: no path expected after the host")
        if parts.query or parts.fragment:
            raise ValueError(f"bad store address {text!r}: no query expected")
    endpoints = tuple(_endpoint(e, text) for e in rest.split(",")) if rest else ()
    if not endpoints:
        raise ValueError(f"bad store address {text!r}: no HOST:PORT given")
    if scheme == "tcp" and len(endpoints) != 1:
        raise ValueError(f"a TCPStore has one address, got {len(endpoints)} in {text!r}")
    return StoreSpec(scheme, endpoints, prefix)


def with_prefix(spec: StoreSpec, run_id: str) -> StoreSpec:
    """An etcd store with no prefix named gets one after the run id (one per run)."""
    if spec.scheme != "etcd" or spec.prefix:
        return spec
    return replace(spec, prefix=f"elasticpg-{run_id}")


@contextmanager
def store_for_workers(spec: StoreSpec | None, world_size: int, timeout: float,
                      node_rank: int = 0) -> Iterator[WorkerStore]:
    """The store to give the workers, valid inside the block. Hosts a TCPStore in this process
    when `spec` is None; checks an external one answers within `timeout` (and, for etcd,
    claims node `node_rank`'s place under the prefix)."""
    import torch.distributed as dist

    if spec is None:
        store, port = listen_store(world_size, timeout)
        try:
            yield WorkerStore(HOST, port)
        finally:
            del store
        return
    if spec.scheme == "etcd":
        _claim_etcd(spec, timeout, node_rank)
        yield WorkerStore(url=str(spec))
        return
    (host, port), = spec.endpoints
    try:
        probe = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout),
                              wait_for_workers=False)
    except (RuntimeError, OSError) as exc:  # DistStoreError derives from RuntimeError
        raise LaunchError(f"--store {host}:{port} did not answer within {timeout:g} s: "
                          f"{exc}") from None
    del probe
    yield WorkerStore(host, port)


def _claim_etcd(spec: StoreSpec, timeout: float, node_rank: int) -> None:
    """Reach the cluster within `timeout` and make sure no launcher for this node used the
    prefix before (a stale prefix, or two launchers given the same --node-rank)."""
    from ..control.etcd_store import EtcdStore

    if not spec.prefix:
        raise LaunchError(f"--store {spec}: an etcd store needs a key prefix")
    try:
        store = EtcdStore([f"{h}:{p}" for h, p in spec.endpoints], spec.prefix,
                          timeout=timedelta(seconds=timeout))
    except ImportError as exc:
        raise LaunchError(f"--store {spec}: {exc}") from None
    try:
        launches = store.add(NODE_KEY.format(node_rank), 1)
    except (RuntimeError, OSError) as exc:  # DistNetworkError derives from RuntimeError
        raise LaunchError(f"--store {spec} did not answer within {timeout:g} s: "
                          f"{exc}") from None
    finally:
        store.close()
    if launches > 1:
        raise LaunchError(
            f"--store {spec}: the prefix {spec.prefix!r} was used before by a launcher for "
            f"node {node_rank} (an earlier run, or another launcher with --node-rank "
            f"{node_rank}); its groups' views would be taken for this run's: give this run a "
            f"new prefix (or delete the old keys: etcdctl del --prefix /{spec.prefix}/)")
