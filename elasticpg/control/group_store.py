"""The group's keys in a c10d Store: every key elasticpg reads or writes is named here.

Only set/get/add/compare_set/wait/check are used, so any c10d store works. torch hands each
backend a store already prefixed with the group name, so keys here are group-local.

  secret                    per-group random secret (first compare_set wins), or only a
                            fingerprint of one from $ELASTICPG_SECRET(_FILE) (control/secret.py)
  founders                  the founding world size (written by every founder)
  slots                     the founders' slot capacity (a joiner that declared fewer adopts it)
  ep/<rank>                 "host:port:incarnation" of that rank's data-plane listener
  shm/<rank>                "host id|pid|fd|region id|slots|window" of its shared-memory
                            region ("" when it does not use shared memory)
  inc/<rank>                counter: how many processes have registered for that slot
  view/<epoch>              an encoded View; written once, by compare_set: one decision per epoch
  view/latest               the highest decided epoch (monotonic, written after view/<epoch>)
  join/<rank>/<inc>.<n>     one join attempt: "waiting", then exactly one of "admitting@<seq>"
                            (the members won) or "abandoned" (the joiner gave up first), by
                            compare_set, so the two sides can never both win
  joined/<rank>/<inc>.<n>   the view that activated that attempt (encoded)

A store that fails a request raises ControlPlaneError (a wait that runs out of time raises
OperationTimeoutError), so callers never mistake a store outage for anything else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

from ..core.group_state import JoinAttempt
from ..core.membership import View
from ..errors import ControlPlaneError, OperationTimeoutError
from . import secret as secrets

T = TypeVar("T")
WAITING, ABANDONED = "waiting", "abandoned"


def _bounding(store: dist.Store) -> Callable[[float], ContextManager[None]]:
    """The `bounded(seconds)` of the store under torch's PrefixStores (EtcdStore has one: its
    operations otherwise retry for the store's whole timeout); a no-op for other stores, whose
    requests fail fast when their server is gone."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return getattr(store, "bounded", lambda _seconds: nullcontext())


class GroupStore:
    def __init__(self, store: dist.Store, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        self._bounded = _bounding(store)

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return fn(*args)
        except dist.DistError as exc:
            raise ControlPlaneError(f"the group's store failed to {what}: {exc}") from None

    def wait_key(self, key: str, timeout: float | None = None) -> bytes:
        t = self.timeout if timeout is None else timeout
        try:
            self.store.wait([key], timedelta(seconds=max(t, 0.001)))
        except dist.DistStoreError as exc:  # c10d's timeout (also a refused wait)
            raise OperationTimeoutError(f"store key {key!r} did not appear within {t:.1f}s: "
                                        f"{exc}") from None
        except dist.DistError as exc:
            raise ControlPlaneError(f"the group's store failed while waiting for {key!r}: "
                                    f"{exc}") from None
        return self._call(f"read {key!r}", self.store.get, key)

    def secret(self) -> bytes:
        """The group's data-plane secret: external (control/secret.py) or agreed here."""
        external = secrets.external_secret()
        mine = secrets.marker(external) if external else os.urandom(32).hex()
        got = self._call("agree on the group secret", self.store.compare_set, "secret", "",
                         mine).decode()
        secrets.check_marker(got, external)
        return external or bytes.fromhex(got)

    def register(self, rank: int) -> int:
        """Count this process as the next incarnation of slot `rank`."""
        return int(self._call("register", self.store.add, f"inc/{rank}", 1))

    def announce_founders(self, world_size: int, slots: int) -> None:
        self._call("announce the slot capacity", self.store.set, "slots", str(slots))
        self._call("announce the founders", self.store.set, "founders", str(world_size))

    def capacity(self) -> int | None:
        """The slot capacity the founders announced, None if none has (yet): no wait."""
        if not self._call("look for the slot capacity", self.store.check, ["slots"]):
            return None
        return int(self._call("read the slot capacity", self.store.get, "slots"))

    def founders(self, timeout: float) -> int:
        return int(self.wait_key("founders", timeout))

    def publish_endpoint(self, rank: int, host: str, port: int, incarnation: int) -> None:
        self._call("publish an endpoint", self.store.set, f"ep/{rank}",
                   f"{host}:{port}:{incarnation}")

    def endpoint(self, rank: int, timeout: float | None = None) -> tuple[str, int, int]:
        host, port, inc = self.wait_key(f"ep/{rank}", timeout).decode().rsplit(":", 2)
        return host, int(port), int(inc)

    def publish_shm(self, rank: int, info: str) -> None:
        self._call("publish a shared-memory region", self.store.set, f"shm/{rank}", info)

    def shm_info(self, rank: int, timeout: float | None = None) -> str:
        return self.wait_key(f"shm/{rank}", timeout).decode()

    # ---- views ------------------------------------------------------------------------------
    def propose_view(self, view: View, by: int = -1) -> View:
        """Try to decide `view` as epoch view.epoch, as rank `by`'s proposal; return whichever
        view won that epoch (its `by` tells whose it is)."""
        raw = self._call("decide a view", self.store.compare_set, f"view/{view.epoch}", "",
                         view.encode(by).decode())
        won = View.decode(raw)
        self._raise_latest(won.epoch)
        return won

    def _raise_latest(self, epoch: int) -> None:
        """view/latest only grows: compare-and-set it up to `epoch` (usually from epoch - 1:
        one round trip)."""
        cur = str(epoch - 1) if epoch > 1 else ""
        while True:
            got = self._call("record the latest view", self.store.compare_set, "view/latest",
                             cur, str(epoch)).decode()
            if got == str(epoch) or (got and int(got) >= epoch):
                return
            cur = got

    def latest_epoch(self, bound: float | None = None) -> int:
        """The highest decided epoch (0: none yet). `bound`: give up (ControlPlaneError) after
        that many seconds instead of the store's timeout, where the store can (a poll)."""
        with self._bounded(bound) if bound is not None else nullcontext():
            if not self._call("read the latest view", self.store.check, ["view/latest"]):
                return 0
            return int(self._call("read the latest view", self.store.get, "view/latest"))

    def view(self, epoch: int, timeout: float | None = None) -> View:
        return View.decode(self.wait_key(f"view/{epoch}", timeout))

    # ---- joins --------------------------------------------------------------------------------
    @staticmethod
    def _join_key(kind: str, join: JoinAttempt) -> str:
        return f"{kind}/{join.slot}/{join.incarnation}.{join.attempt}"

    def open_join(self, join: JoinAttempt) -> None:
        self._call("open a join", self.store.set, self._join_key("join", join), WAITING)

    def admit_join(self, join: JoinAttempt, start_seq: int) -> bool:
        """Members: claim the attempt for admission at `start_seq`. Every member calls it with
        the same arguments; all of them see the same answer (False: the joiner gave up first)."""
        mine = f"admitting@{start_seq}"
        got = self._call("admit a joiner", self.store.compare_set,
                         self._join_key("join", join), WAITING, mine).decode()
        return got == mine

    def abandon_join(self, join: JoinAttempt) -> bool:
        """Joiner: give the attempt up; False if the members claimed it first."""
        got = self._call("abandon a join", self.store.compare_set,
                         self._join_key("join", join), WAITING, ABANDONED).decode()
        return got == ABANDONED

    def announce_joined(self, join: JoinAttempt, view: View) -> None:
        """The view that activated `join` (the joiner reads it from this key: no second
        round trip while every member waits for the joiner's first post)."""
        self._call("announce an activation", self.store.set, self._join_key("joined", join),
                   view.encode().decode())

    def wait_joined(self, join: JoinAttempt, timeout: float) -> View:
        return View.decode(self.wait_key(self._join_key("joined", join), timeout))
