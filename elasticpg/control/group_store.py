"""The group's keys in a c10d Store.

Only set/get/add/compare_set/wait/check are used, so any c10d store works. torch hands each
backend a store already prefixed with the group name, so keys here are group-local.

  secret              per-group random secret (first compare_set wins)
  ep/<rank>           "host:port:incarnation" of that rank's data-plane listener
  shm/<rank>          "host id|pid|fd|region id|slots|window" of its shared-memory region
                      ("" when it does not use shared memory)
  inc/<rank>          counter: how many processes have registered for that slot
  view/<epoch>        an encoded View; written once, by compare_set, so one decision per epoch
  view/latest         the highest decided epoch (monotonic, written after view/<epoch>)
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from ..core.membership import View
from ..errors import OperationTimeoutError


class GroupStore:
    def __init__(self, store: dist.Store, timeout: float) -> None:
        self.store = store
        self.timeout = timeout

    def wait_key(self, key: str, timeout: float | None = None) -> bytes:
        t = self.timeout if timeout is None else timeout
        try:
            self.store.wait([key], timedelta(seconds=max(t, 0.001)))
        except Exception as exc:  # c10d raises DistStoreError/RuntimeError on timeout
            raise OperationTimeoutError(f"store key {key!r} did not appear within {t:.1f}s: "
                                        f"{exc}") from None
        return self.store.get(key)

    def secret(self) -> bytes:
        mine = os.urandom(32).hex()
        return bytes.fromhex(self.store.compare_set("secret", "", mine).decode())

    def register(self, rank: int) -> int:
        """Count this process as the next incarnation of slot `rank`."""
        return int(self.store.add(f"inc/{rank}", 1))

    def publish_endpoint(self, rank: int, host: str, port: int, incarnation: int) -> None:
        self.store.set(f"ep/{rank}", f"{host}:{port}:{incarnation}")

    def endpoint(self, rank: int, timeout: float | None = None) -> tuple[str, int, int]:
        host, port, inc = self.wait_key(f"ep/{rank}", timeout).decode().rsplit(":", 2)
        return host, int(port), int(inc)

    def publish_shm(self, rank: int, info: str) -> None:
        self.store.set(f"shm/{rank}", info)

    def shm_info(self, rank: int, timeout: float | None = None) -> str:
        return self.wait_key(f"shm/{rank}", timeout).decode()

    # ---- views ------------------------------------------------------------------------------
    def propose_view(self, view: View) -> View:
        """Try to decide `view` as epoch view.epoch; return whichever view won that epoch."""
        won = View.decode(self.store.compare_set(f"view/{view.epoch}", "",
                                                 view.encode().decode()))
        self._raise_latest(won.epoch)
        return won

    def _raise_latest(self, epoch: int) -> None:
        """view/latest only grows: compare-and-set it up to `epoch`."""
        cur = ""
        while True:
            got = self.store.compare_set("view/latest", cur, str(epoch)).decode()
            if got == str(epoch) or (got and int(got) >= epoch):
                return
            cur = got

    def latest_epoch(self) -> int:
        if not self.store.check(["view/latest"]):
            return 0
        return int(self.store.get("view/latest"))

    def view(self, epoch: int, timeout: float | None = None) -> View:
        return View.decode(self.wait_key(f"view/{epoch}", timeout))
