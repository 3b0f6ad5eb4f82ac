"""A c10d Store on etcd's v3 API, so that the control plane survives the loss of any one machine.

etcd is reached through its v3 JSON gateway (``/v3/kv/...``, ``/v3/watch``) with `requests`
(optional extra ``elasticpg[etcd]``): etcd >= 3.4 serves the gateway on every client port, and
the gRPC client libraries for Python are unmaintained. torchrun's etcd rendezvous speaks the v2
API, which etcd 3.4 disables by default and 3.6 removed.

Why the operations stay linearizable: every read is a linearizable range (etcd's default) and
every conditional write is one etcd transaction, so `compare_set` -- what view decisions are
made of (control/group_store.py) -- is decided once, by the raft log, whichever member a
process talks to. A request that fails (a member died, lost its leader, or did not answer in
`request_timeout`) is retried on the next member until the operation's deadline; retries are
safe because

* `set`, `multi_set`: idempotent;
* `compare_set`: a retry of a swap that did commit finds `desired` in place and returns it,
  which is exactly what the committed first try would have returned (callers' desired values
  are unique per proposer or equal for equal proposals);
* `add`: each call writes a marker key in the same transaction as the counter, so a retry
  first finds out whether its earlier try committed (exactly once, never twice);
* `delete_key`: idempotent; a retry after a committed delete reports False.

Keys live under ``/<prefix>/k/`` (one prefix per job); `add`'s markers under ``/<prefix>/a/``.
A store that cannot be reached at all raises DistNetworkError once the operation's bound is
spent (never a hang); a `wait` that runs out of time raises DistStoreError, as TCPStore does.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(seconds=300)
REQUEST_TIMEOUT = 2.0  # one HTTP request to one member; then the next member is tried
WATCH_SLICE = 1.0  # a watch is re-opened (after a fresh read) at least this often
SCHEME = "etcd"
log = logging.getLogger("elasticpg.control")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _as_bytes(value: str | bytes | Sequence[int]) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _range_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with `prefix`"."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class _MemberError(Exception):
    """One member could not serve one request (the next member may)."""


def parse_endpoints(text: str) -> list[str]:
    """"h:p,h:p" -> ["http://h:p", ...]; a clear ValueError for anything else."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad etcd endpoint {part!r} in {text!r}: expected HOST:PORT")
        out.append(f"http://{part}")
    if not out:
        raise ValueError("no etcd endpoints given")
    return out


def parse_url(url: str) -> tuple[list[str], str]:
    """``etcd://host:port[,host:port...]/prefix`` -> (endpoints, prefix)."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError(f"not an etcd URL: {url!r} (expected etcd://HOST:PORT[,...]/PREFIX)")
    prefix = parts.path.strip("/")
    if not prefix:
        raise ValueError(f"etcd URL {url!r} names no key prefix: etcd://HOST:PORT/PREFIX, one "
                         f"prefix per job")
    return parse_endpoints(parts.netloc), prefix


class EtcdStore(dist.Store):
    """`torch.distributed.Store` whose keys live in an etcd cluster (any member answers).

    `endpoints`: client URLs or HOST:PORT of the cluster's members; `prefix`: this job's
    namespace (two jobs with different prefixes never see each other's keys); `timeout`: the
    default bound of every operation (`wait` and `get` wait this long for a key).

    Every instance stays referenced (by the class) until `close()`: torch keeps only the C++
    half of a Python store (inside its PrefixStores), and once the Python half is collected
    its methods are gone ("pure virtual function" errors), e.g. for a store made by the
    etcd:// handler or passed as ``store=EtcdStore(...)`` without a name.
    """

    _kept: set[EtcdStore] = set()

    def __init__(self, endpoints: Sequence[str] | str, prefix: str,
                 timeout: timedelta = DEFAULT_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        super().__init__()
        try:
            import requests
        except ImportError as exc:  # the optional extra is missing
            raise ImportError("EtcdStore needs `requests`: pip install 'elasticpg[etcd]'"
                              ) from exc
        self._requests = requests
        if isinstance(endpoints, str):
            endpoints = parse_endpoints(endpoints)
        self.endpoints = [e if "://" in e else f"http://{e}" for e in endpoints]
        if not self.endpoints:
            raise ValueError("EtcdStore needs at least one endpoint")
        prefix = prefix.strip("/")
        if not prefix:
            raise ValueError("EtcdStore needs a non-empty key prefix (one per job)")
        self.prefix = prefix
        self._data = f"/{prefix}/k/".encode()
        self._marks = f"/{prefix}/a/".encode()
        self.request_timeout = request_timeout
        self._preferred = 0  # the member that answered last (shared by threads: a hint only)
        self._local = threading.local()  # one HTTP session per thread
        self.set_timeout(timeout)
        EtcdStore._kept.add(self)

    def close(self) -> None:
        """Forget this store (its group must be destroyed already): see the class note."""
        EtcdStore._kept.discard(self)
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()

    # ---- transport ----------------------------------------------------------------------------
    def _session(self) -> Any:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = self._requests.Session()
        return s

    def _deadline(self, timeout: timedelta | None = None) -> float:
        t = (self.timeout if timeout is None else timeout).total_seconds()
        bound = getattr(self._local, "bound", None)
        if bound is not None:
            t = min(t, bound)
        return time.monotonic() + max(t, 0.001)

    @contextmanager
    def bounded(self, seconds: float) -> Iterator[None]:
        """Within the block, this thread's operations give up after `seconds` at the most (the
        c10d API has no per-call timeout but for `wait`): a periodic poll (the liveness
        thread's) must not stall its heartbeats for a whole store timeout while etcd is away."""
        saved = getattr(self._local, "bound", None)
        self._local.bound = seconds if saved is None else min(saved, seconds)
        try:
            yield
        finally:
            self._local.bound = saved

    def _members(self, deadline: float) -> Iterator[str]:
        """Members to try in turn until the deadline: the last good one first, then the others;
        a short pause after every full round (a leader election takes ~1 s)."""
        n, pause, start = len(self.endpoints), 0.05, self._preferred
        first = True
        while True:
            for i in range(n):
                if time.monotonic() >= deadline and not first:
                    return
                first = False
                yield self.endpoints[(start + i) % n]
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.5)

    def _post(self, path: str, body: dict, deadline: float, what: str) -> dict:
        """POST to one member after another until one answers or the deadline passes."""
        rq = self._requests
        errors: list[str] = []
        started = time.monotonic()
        for url in self._members(deadline):
            left = deadline - time.monotonic()
            try:
                r = self._session().post(url + path, json=body,
                                         timeout=min(self.request_timeout, max(left, 0.001)))
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    raise dist.DistStoreError(f"etcd store: {what} was refused by {url}: HTTP "
                                              f"{r.status_code}: {r.text.strip()[:300]}")
                if r.status_code != 200:
                    raise _MemberError(f"HTTP {r.status_code}: {r.text.strip()[:200]}")
                self._preferred = self.endpoints.index(url)
                return r.json()
            except (rq.RequestException, _MemberError, ValueError) as exc:
                errors.append(f"{url}: {type(exc).__name__}: {str(exc)[:160]}")
                log.debug("etcd store: %s failed at %s (trying the next member): %s", what,
                          url, exc)
        last = "; ".join(errors[-len(self.endpoints):]) or "no time left"
        raise dist.DistNetworkError(
            f"etcd store ({','.join(self.endpoints)}, prefix {self.prefix!r}) could not "
            f"{what} within {max(deadline - started, 0):.1f} s: no member answered "
            f"({len(errors)} tries; last: {last})")

    def _txn(self, compare: list[dict], success: list[dict], failure: list[dict],
             deadline: float, what: str) -> dict:
        return self._post("/v3/kv/txn", {"compare": compare, "success": success,
                                         "failure": failure}, deadline, what)

    # ---- key helpers --------------------------------------------------------------------------
    def _key(self, key: str) -> bytes:
        return self._data + key.encode()

    @staticmethod
    def _range(k: bytes, count_only: bool = False) -> dict:
        op: dict[str, Any] = {"key": _b64(k)}
        if count_only:
            op["count_only"] = True
        return {"request_range": op}

    @staticmethod
    def _put(k: bytes, v: bytes) -> dict:
        return {"request_put": {"key": _b64(k), "value": _b64(v)}}

    @staticmethod
    def _kvs(resp: dict, i: int) -> list[dict]:
        return resp.get("responses", [])[i].get("response_range", {}).get("kvs", [])

    @staticmethod
    def _count(resp: dict, i: int) -> int:
        return int(resp.get("responses", [])[i].get("response_range", {}).get("count", 0))

    def _read(self, keys: Sequence[str], deadline: float) -> tuple[int, list[bytes | None]]:
        """(revision, values) of `keys` in one linearizable read (None: missing)."""
        resp = self._txn([], [self._range(self._key(k)) for k in keys], [], deadline,
                         f"read {list(keys)!r}")
        vals: list[bytes | None] = []
        for i in range(len(keys)):
            kvs = self._kvs(resp, i)
            vals.append(_unb64(kvs[0].get("value")) if kvs else None)
        return int(resp["header"]["revision"]), vals

    # ---- the c10d Store API -------------------------------------------------------------------
    def set(self, key: str, value: str | bytes) -> None:
        self._post("/v3/kv/put", {"key": _b64(self._key(key)), "value": _b64(_as_bytes(value))},
                   self._deadline(), f"set {key!r}")

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"multi_set: {len(keys)} keys but {len(values)} values")
        puts = [self._put(self._key(k), _as_bytes(v)) for k, v in zip(keys, values, strict=True)]
        self._txn([], puts, [], self._deadline(), f"set {keys!r}")

    def get(self, key: str) -> bytes:
        return self.multi_get([key])[0]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        """Values of `keys`, waiting (up to the store's timeout) for the missing ones."""
        deadline = self._deadline()
        _, vals = self._read(keys, deadline)
        if any(v is None for v in vals):
            self._wait(keys, deadline)
            _, vals = self._read(keys, deadline)
        if any(v is None for v in vals):  # deleted again between the wait and the read
            missing = [k for k, v in zip(keys, vals, strict=True) if v is None]
            raise dist.DistStoreError(f"etcd store: keys {missing!r} vanished while read")
        return [v for v in vals if v is not None]

    def check(self, keys: list[str]) -> bool:
        resp = self._txn([], [self._range(self._key(k), count_only=True) for k in keys], [],
                         self._deadline(), f"check {keys!r}")
        return all(self._count(resp, i) > 0 for i in range(len(keys)))

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        """TCPStore's semantics: swap in `desired` if the value is `expected` (an empty
        `expected` also matches a missing key) and return `desired`; otherwise return the
        current value (`expected` itself when the key is missing). One etcd transaction."""
        k, exp, want = self._key(key), _as_bytes(expected), _as_bytes(desired)
        deadline = self._deadline()
        kb = _b64(k)
        if exp:
            cond = {"key": kb, "target": "VALUE", "result": "EQUAL", "value": _b64(exp)}
        else:
            cond = {"key": kb, "target": "VERSION", "result": "EQUAL", "version": "0"}
        while True:
            resp = self._txn([cond], [self._put(k, want)], [self._range(k)], deadline,
                             f"compare_set {key!r}")
            if resp.get("succeeded"):
                return want
            kvs = self._kvs(resp, 0)
            if not kvs:
                return exp  # missing, and a value was expected
            cur = _unb64(kvs[0].get("value"))
            if cur != exp:
                return cur
            # present with an empty value while "" was expected: swap on this exact revision
            cond = {"key": kb, "target": "MOD", "result": "EQUAL",
                    "mod_revision": kvs[0]["mod_revision"]}

    def add(self, key: str, amount: int) -> int:
        """Add `amount` to the integer at `key` (missing: 0) and return the sum, exactly once:
        the counter and a marker for this call are written in one transaction."""
        k, mark = self._key(key), self._marks + uuid.uuid4().hex.encode()
        deadline = self._deadline()
        while True:
            resp = self._txn([], [self._range(k), self._range(mark)], [], deadline,
                             f"add to {key!r}")
            done = self._kvs(resp, 1)
            if done:  # an earlier try of this very call committed
                result = int(_unb64(done[0].get("value")))
                break
            kvs = self._kvs(resp, 0)
            cur = int(_unb64(kvs[0].get("value")) or b"0") if kvs else 0
            result = cur + int(amount)
            same = ({"key": _b64(k), "target": "MOD", "result": "EQUAL",
                     "mod_revision": kvs[0]["mod_revision"]} if kvs else
                    {"key": _b64(k), "target": "VERSION", "result": "EQUAL", "version": "0"})
            out = self._txn([same], [self._put(k, str(result).encode()),
                                     self._put(mark, str(result).encode())], [], deadline,
                            f"add to {key!r}")
            if out.get("succeeded"):
                break
        try:  # its own short bound: the add is done even if its bound is spent
            self._post("/v3/kv/deleterange", {"key": _b64(mark)},
                       time.monotonic() + self.request_timeout, "drop an add marker")
        except dist.DistNetworkError as exc:
            log.info("etcd store: an add's marker stays behind (harmless): %s", exc)
        return result

    def delete_key(self, key: str) -> bool:
        resp = self._post("/v3/kv/deleterange", {"key": _b64(self._key(key))},
                          self._deadline(), f"delete {key!r}")
        return int(resp.get("deleted", 0)) > 0

    deleteKey = delete_key  # noqa: N815 - the name torch's C++ trampoline looks up

    def num_keys(self) -> int:
        resp = self._post("/v3/kv/range", {"key": _b64(self._data),
                                           "range_end": _b64(_range_end(self._data)),
                                           "count_only": True}, self._deadline(), "count keys")
        return int(resp.get("count", 0))

    getNumKeys = num_keys  # noqa: N815 - the name torch's C++ trampoline looks up

    def keys(self) -> list[str]:
        """Every key of this job (for `elasticpg status`; not part of c10d's Store API)."""
        resp = self._post("/v3/kv/range", {"key": _b64(self._data),
                                           "range_end": _b64(_range_end(self._data)),
                                           "keys_only": True}, self._deadline(), "list keys")
        n = len(self._data)
        return [_unb64(kv["key"])[n:].decode() for kv in resp.get("kvs", [])]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait(keys, self._deadline(timeout))

    # ---- waiting ------------------------------------------------------------------------------
    def _wait(self, keys: Sequence[str], deadline: float) -> None:
        """Until every key exists: a read, then a watch from the read's revision (so no write
        between the two is missed), re-read at least every WATCH_SLICE seconds."""
        started = time.monotonic()
        while True:
            # a read at the deadline still gets one request's time: a timeout, not an outage
            rev, vals = self._read(keys, max(deadline, time.monotonic() + self.request_timeout))
            missing = {self._key(k) for k, v in zip(keys, vals, strict=True) if v is None}
            if not missing:
                return
            if time.monotonic() >= deadline:
                names = sorted(k for k, v in zip(keys, vals, strict=True) if v is None)
                raise dist.DistStoreError(
                    f"wait timeout after {time.monotonic() - started:.1f}s: etcd store keys "
                    f"{names!r} (prefix {self.prefix!r}) did not appear")
            self._watch_for(missing, rev + 1, min(deadline, time.monotonic() + WATCH_SLICE))

    def _watch_for(self, missing: set[bytes], start_rev: int, until: float) -> None:
        """Watch the job's keys from `start_rev` until every one of `missing` was put or
        `until` passes (any failure just ends the watch: the caller re-reads)."""
        rq = self._requests
        body = {"create_request": {"key": _b64(self._data),
                                   "range_end": _b64(_range_end(self._data)),
                                   "start_revision": str(start_rev)}}
        url = self.endpoints[self._preferred]
        left = until - time.monotonic()
        if left <= 0:
            return
        try:
            with self._session().post(url + "/v3/watch", json=body, stream=True,
                                      timeout=(min(self.request_timeout, left), left)) as r:
                if r.status_code != 200:
                    self._preferred = (self._preferred + 1) % len(self.endpoints)
                    return
                for line in r.iter_lines():
                    if not line:
                        continue
                    result = json.loads(line).get("result", {})
                    for ev in result.get("events", []):
                        if ev.get("type", "PUT") == "PUT":
                            missing.discard(_unb64(ev["kv"]["key"]))
                    if not missing or time.monotonic() >= until:
                        return
        except (rq.RequestException, ValueError):
            # the slice ran out (the caller reads again), or the member failed early: if it
            # does not answer a health check either, the next read and watch go elsewhere
            if time.monotonic() < until - 0.05 and not self._alive(url):
                self._preferred = (self._preferred + 1) % len(self.endpoints)

    def _alive(self, url: str) -> bool:
        try:
            self._session().get(url + "/health", timeout=min(self.request_timeout, 0.5))
        except self._requests.RequestException:
            return False
        return True


INIT_METHOD_ENV = "ELASTICPG_INIT_METHOD"  # etcd://...: what env:// means in this process


def rendezvous_handler(url: str, timeout: timedelta = DEFAULT_TIMEOUT,
                       **kwargs: object) -> Iterator[tuple[EtcdStore, int, int]]:
    """torch's rendezvous protocol for ``init_method="etcd://host:port,.../prefix"``: rank and
    world size come from init_process_group (which adds them to the URL's query), else from
    RANK and WORLD_SIZE in the environment, as for env://."""
    endpoints, prefix = parse_url(url)
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    try:
        rank = int(query["rank"] if "rank" in query else os.environ["RANK"])
        world = int(query["world_size"] if "world_size" in query else os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ValueError(f"etcd:// init_method needs rank and world_size (pass them to "
                         f"init_process_group, or set RANK and WORLD_SIZE): {url!r}") from None
    store = EtcdStore(endpoints, prefix, timeout=timeout)
    yield store, rank, world
    raise RuntimeError("etcd:// rendezvous handler is single-use")


def _env_or_etcd(torch_env: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """torch's env:// handler, except where $ELASTICPG_INIT_METHOD names an etcd URL: then
    that. `elasticpg run --store etcd://...` sets it, so that a script written for torchrun
    (`init_process_group("elasticpg")`, i.e. env://) rendezvouses on etcd unchanged; torch's
    env:// itself can only build a TCPStore from MASTER_ADDR and MASTER_PORT."""
    def handler(url: str, timeout: timedelta = DEFAULT_TIMEOUT,
                **kwargs: object) -> Iterator[tuple[dist.Store, int, int]]:
        target = os.environ.get(INIT_METHOD_ENV, "")
        if not target:
            return torch_env(url, timeout=timeout, **kwargs)
        if urlsplit(target).scheme != SCHEME:
            raise ValueError(f"${INIT_METHOD_ENV}={target!r}: expected an etcd:// URL")
        query = urlsplit(url).query  # the rank and world size torch added, if any
        if query:
            target += ("&" if urlsplit(target).query else "?") + query
        return rendezvous_handler(target, timeout=timeout)

    handler.elasticpg_wraps = torch_env  # type: ignore[attr-defined]
    return handler


def register_rendezvous() -> None:
    """Make ``init_method="etcd://..."`` work, and env:// honour $ELASTICPG_INIT_METHOD;
    idempotent."""
    import importlib

    # the module, not torch.distributed.rendezvous (the function of the same name)
    rdzv = importlib.import_module("torch.distributed.rendezvous")
    handlers = rdzv._rendezvous_handlers
    if SCHEME not in handlers:
        dist.register_rendezvous_handler(SCHEME, rendezvous_handler)
    env = handlers.get("env")
    # torch offers no way to replace a handler but its registry; wrapped once, never twice
    if env is not None and not hasattr(env, "elasticpg_wraps"):
        handlers["env"] = _env_or_etcd(env)
