"""The environment `elasticpg run` gives a worker: the contract between launcher and script.

Two halves of one contract, kept in one place so that they cannot drift apart:

* the launcher side, `worker_env`: torchrun's variables (so `dist.init_process_group(...)` with
  env:// works unchanged in a script written for torchrun) plus elasticpg's replacement mark;
* the worker side, `is_replacement` and `restart_count`: what the backend creator and scripts
  read back.

`TORCHELASTIC_USE_AGENT_STORE=True` makes torch's env:// rendezvous connect every rank, rank 0
included, as a client to the store at MASTER_ADDR:MASTER_PORT (the launcher's, or an external
one) instead of rank 0 hosting it: no worker is special, and the store outlives any worker.
With an etcd store the worker gets `ELASTICPG_INIT_METHOD=etcd://...` instead (and no
MASTER_ADDR / MASTER_PORT): `import elasticpg` makes env:// rendezvous there
(control/etcd_store.py), so the same script runs unchanged on either store.

`TORCHELASTIC_RESTART_COUNT` stays 0: in torchrun it counts restarts of the whole worker group,
which `elasticpg run` never does, and some torch versions key the env:// store by it
(`/worker/attempt_<n>`), so a per-slot value would put a replacement in another key space than
its peers. The per-slot count is `ELASTICPG_RESTART_COUNT`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..control.etcd_store import INIT_METHOD_ENV

REPLACEMENT_ENV = "ELASTICPG_REPLACEMENT"  # "1": this process refills a slot whose worker died
RESTART_COUNT_ENV = "ELASTICPG_RESTART_COUNT"  # how many times this slot was restarted


@dataclass(frozen=True)
class WorkerSlot:
    """Where one worker sits in the job (torchrun's vocabulary)."""

    local_rank: int
    nproc_per_node: int
    node_rank: int
    nnodes: int

    @property
    def rank(self) -> int:
        """Global rank: nodes hold contiguous blocks of nproc_per_node ranks."""
        return self.node_rank * self.nproc_per_node + self.local_rank

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass(frozen=True)
class WorkerStore:
    """The store the workers are told about: a TCPStore's address, or an etcd URL."""

    host: str = ""
    port: int = 0
    url: str = ""  # etcd://HOST:PORT[,...]/PREFIX; then host and port are unused

    def env(self) -> dict[str, str]:
        if self.url:
            return {INIT_METHOD_ENV: self.url}
        return {"MASTER_ADDR": self.host, "MASTER_PORT": str(self.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"}

    def __str__(self) -> str:
        return self.url or f"{self.host}:{self.port}"


# what one kind of store sets, the other must not inherit from the launcher's environment
_STORE_VARS = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", INIT_METHOD_ENV)


def worker_env(slot: WorkerSlot, restarts: int, store: WorkerStore, run_id: str,
               max_restarts: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment of one worker process (`base`: the launcher's, by default)."""
    env = dict(os.environ if base is None else base)
    for name in _STORE_VARS:
        env.pop(name, None)
    rank, world = str(slot.rank), str(slot.world_size)
    env.update(store.env())
    env.update({
        "RANK": rank, "LOCAL_RANK": str(slot.local_rank), "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": str(slot.nproc_per_node), "GROUP_RANK": str(slot.node_rank),
        "GROUP_WORLD_SIZE": str(slot.nnodes), "ROLE_RANK": rank, "ROLE_WORLD_SIZE": world,
        "ROLE_NAME": "default", "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts), "TORCHELASTIC_RUN_ID": run_id,
        REPLACEMENT_ENV: "1" if restarts else "0", RESTART_COUNT_ENV: str(restarts),
        # output reaches the launcher line by line, in time, to be prefixed with the rank
        "PYTHONUNBUFFERED": "1",
    })
    if slot.nproc_per_node > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: workers do not fight for cores
    return env


def is_replacement() -> bool:
    """Was this process started by `elasticpg run` to refill a slot whose worker died?"""
    return os.environ.get(REPLACEMENT_ENV) == "1"


def restart_count() -> int:
    """How many times `elasticpg run` restarted this slot (0 for the first worker, or when not
    launched by it)."""
    raw = os.environ.get(RESTART_COUNT_ENV, "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{RESTART_COUNT_ENV} must be an integer, got {raw!r}") from None
