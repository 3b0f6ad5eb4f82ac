"""Mooncake PG's Python names (the `mooncake.pg` module of kvcache-ai/Mooncake) on top of elasticpg.

Code written for the reference runs unchanged on a machine without GPUs or RDMA::

    from elasticpg.compat import mooncake as compat
    compat.install_alias()        # sys.modules["mooncake"], ["mooncake.pg"]; backend "mooncake-cpu"
    from mooncake import pg

    active = torch.ones(world_size, dtype=torch.int32)
    dist.init_process_group("mooncake-cpu", rank=rank, world_size=world_size,
                            pg_options=pg.MooncakeBackendOptions(active))
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    pg.get_active_ranks(backend)  # `active` is kept as a live mirror of the same mask

Or without the alias: `from elasticpg.compat import mooncake as pg` and `pg.register_backend()`.
Nothing happens at import time; `install_alias` and `register_backend` are explicit.

The functions are the ones of `elasticpg.api` (same objects, no logic here): each takes a
ProcessGroup or `group._get_backend(device)` (which, for elasticpg, is the group itself).
Signatures follow the reference: `get_active_ranks(backend)`, `get_num_synced_ranks(backend)`,
`extend_group_size_to(backend, size)`, `get_peer_state(backend, ranks) -> list[bool]`,
`activate_ranks(backend, ranks)` / `recover_ranks` (alias) / `deactivate_ranks(backend, ranks)`
returning a result with `.status` (`ProposalStatus`, also under the reference's older name
`ViewUpdateStatus`), `.new_epoch`, `.dropped_ranks`, `.reject_reason`; `join_group(backend)`;
`sync_after_failure(backend)` with `.status` (`SyncAfterFailureStatus`) and `.reject_reason`;
`get_local_success(work)`, `get_failed_ranks_hint(work)`, `get_current_epoch(backend)`.
Where the reference returns None (`join_group`, `extend_group_size_to`) elasticpg returns the
new epoch / the proposal result; callers that ignore the value are unaffected.

Differences from the reference to know about:

* Which calls are collective follows elasticpg (see `elasticpg.api`): `activate_ranks`,
  `recover_ranks`, `deactivate_ranks` and `extend_group_size_to` are made by every active member
  at the same point of its operation sequence.
* `get_peer_state` answers from the readiness that every active member agreed on at its last
  all-to-all collective (so all members answer alike at the same step): poll it between
  collectives, as a serving loop does. A loop that only polls, with no collective in between,
  does not see a joiner become ready.
* A group created without `pg_options` under a name registered here reserves spare slots
  (`LEGACY_CAPACITY`), and a rank that declares a larger world than its founders joins it as
  a scale-up inside `init_process_group`, admitted by the members' `extend_group_size_to`
  (which waits, bounded, for such joiners; the reference returns at once and blocks at the
  next communication instead). A scale-up rank must start after the founders.
* `set_host_ip` sets the data-plane listen address of groups created afterwards (through
  `$ELASTICPG_HOST`, so child processes inherit it); `set_device_filter` is recorded and has no
  effect (there are no RDMA devices to select).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import numbers
import os
import socket
import sys
import types
from collections.abc import Iterable
from dataclasses import fields
from datetime import timedelta
from typing import Any

import torch

from ..api import (
    ProposalResult,
    ProposalStatus,
    SyncAfterFailureResult,
    SyncAfterFailureStatus,
    activate_ranks,
    extend_group_size_to,
    get_active_ranks,
    get_current_epoch,
    get_failed_ranks_hint,
    get_local_success,
    get_num_synced_ranks,
    get_peer_state,
    join_group,
    recover_ranks,
    runtime_of,
    sync_after_failure,
)
from ..api import deactivate_ranks as _deactivate_collectively
from ..options import Options
from ..torch_binding import registration
from ..torch_binding.process_group import ElasticProcessGroup

# the reference's names for the result types and the pre-rename name of the status enum
ViewUpdateStatus = ProposalStatus
ProposeViewUpdateResponse = ProposalResult
SyncAfterFailureResponse = SyncAfterFailureResult

CPU_BACKEND_NAME = "mooncake-cpu"
# Slot capacity of a group created without pg_options: the reference reserves spare slots by
# default, so such a group can be extended later (extend_group_size_to). 64 is elasticpg's
# limit; a slot costs 32 bytes of shared memory per rank and nothing on the collective path.
LEGACY_CAPACITY = 64
HOST_ENV = "ELASTICPG_HOST"  # what elasticpg.group.runtime.default_host() reads

# MooncakeBackendOptions' own fields; every other elasticpg.Options field passes through
_REFERENCE_FIELDS = ("active_ranks", "max_group_size", "is_extension",
                     "auto_deactivate_on_failure", "auto_sync_on_failure")
_PASSTHROUGH = tuple(f.name for f in fields(Options) if f.name not in _REFERENCE_FIELDS)
_SHORT_NAMES = {"auto_deactivate": "auto_deactivate_on_failure",
                "auto_sync": "auto_sync_on_failure"}
# positional parameters of the reference's two constructor families
_TENSOR_FORM = ("active_ranks", "is_extension", "max_group_size")
_SIZE_FORM = ("max_group_size", "is_extension", "auto_deactivate_on_failure",
              "auto_sync_on_failure")


class MooncakeBackendOptions:
    """`pg_options=` for `init_process_group` / `new_group`, in the reference's two forms:

    * `MooncakeBackendOptions(active_ranks[, is_extension[, max_group_size]])`: `active_ranks`
      is a caller-owned 1-D int32 tensor with one entry per slot, kept by the backend as a live
      mirror of the group's active mask (1 = active); its length is the slot capacity.
    * `MooncakeBackendOptions(max_group_size[, is_extension[, auto_deactivate_on_failure,
      auto_sync_on_failure]])`.

    All parameters may also be given by keyword (`auto_deactivate` / `auto_sync` are accepted
    as short names), and so may elasticpg's own options (`timeout`, `failure_timeout`,
    `heartbeat_interval`, `host`), which may also be set as attributes after construction.
    The backend calls `to_options()` to get the `elasticpg.Options` it runs with.
    """

    __slots__ = _REFERENCE_FIELDS + _PASSTHROUGH

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for short, full in _SHORT_NAMES.items():
            if short in kwargs:
                if full in kwargs:
                    raise TypeError(f"MooncakeBackendOptions got both {short!r} and {full!r}")
                kwargs[full] = kwargs.pop(short)
        unknown = sorted(set(kwargs) - set(_REFERENCE_FIELDS) - set(_PASSTHROUGH))
        if unknown:
            raise TypeError(f"MooncakeBackendOptions got unexpected keyword argument(s) "
                            f"{unknown}; accepted: {list(_REFERENCE_FIELDS + _PASSTHROUGH)}")
        if not args and "active_ranks" not in kwargs and "max_group_size" not in kwargs:
            raise TypeError("MooncakeBackendOptions needs an int32 active_ranks tensor or an "
                            "int max_group_size as its first argument")
        tensor_form = (isinstance(args[0], torch.Tensor) if args
                       else "active_ranks" in kwargs)
        names = _TENSOR_FORM if tensor_form else _SIZE_FORM
        if len(args) > len(names):
            raise TypeError(f"MooncakeBackendOptions takes at most {len(names)} positional "
                            f"arguments in this form ({', '.join(names)}), got {len(args)}")
        if not tensor_form and len(args) == 3:
            raise TypeError("MooncakeBackendOptions(max_group_size, is_extension, "
                            "auto_deactivate_on_failure, auto_sync_on_failure): give both "
                            "failure-handling flags, or neither")
        values = dict(zip(names, args, strict=False))
        for name in kwargs:
            if name in values:
                raise TypeError(f"MooncakeBackendOptions got multiple values for {name!r}")
        values.update(kwargs)

        self.active_ranks: torch.Tensor | None = values.get("active_ranks")
        self.max_group_size: int | None = values.get("max_group_size")
        self.is_extension: bool = values.get("is_extension", False)
        self.auto_deactivate_on_failure: bool = values.get("auto_deactivate_on_failure", True)
        self.auto_sync_on_failure: bool = values.get("auto_sync_on_failure", True)
        for name in _PASSTHROUGH:
            setattr(self, name, values.get(name))
        if self.active_ranks is not None:
            _check_active_ranks(self.active_ranks)
            if self.max_group_size is None:
                self.max_group_size = self.active_ranks.numel()
        self.to_options()  # every check, now rather than inside init_process_group

    def to_options(self) -> Options:
        """The `elasticpg.Options` these stand for (the same `active_ranks` tensor object)."""
        if self.active_ranks is not None:
            _check_active_ranks(self.active_ranks)
        size = self.max_group_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"max_group_size must be an int (or pass an int32 active_ranks "
                            f"tensor instead), got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"max_group_size must be at least 1, got {size}")
        if self.active_ranks is not None and self.active_ranks.numel() != size:
            raise ValueError(f"active_ranks has {self.active_ranks.numel()} entries but "
                             f"max_group_size is {size}: the tensor mirrors every slot, so its "
                             f"length must be max_group_size")
        for name in ("is_extension", "auto_deactivate_on_failure", "auto_sync_on_failure"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        _check_passthrough(self)
        options = Options(max_group_size=int(size), is_extension=self.is_extension,
                          auto_deactivate_on_failure=self.auto_deactivate_on_failure,
                          auto_sync_on_failure=self.auto_sync_on_failure,
                          active_ranks=self.active_ranks,
                          **{name: getattr(self, name) for name in _PASSTHROUGH})
        options.validate(int(size))  # auto_sync without auto_deactivate, timeout > 0, ...
        return options

    def __repr__(self) -> str:
        shown = [f"{name}={getattr(self, name)!r}" for name in _REFERENCE_FIELDS[1:]]
        if self.active_ranks is not None:
            shown.insert(0, f"active_ranks={self.active_ranks.tolist()}")
        shown += [f"{name}={getattr(self, name)!r}" for name in _PASSTHROUGH
                  if getattr(self, name) is not None]
        return f"MooncakeBackendOptions({', '.join(shown)})"


def _check_active_ranks(t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"active_ranks must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"active_ranks must have dtype torch.int32, got {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"active_ranks must be a non-empty 1-D tensor, got shape "
                         f"{tuple(t.shape)}")


def _check_passthrough(opts: MooncakeBackendOptions) -> None:
    for name in _PASSTHROUGH:
        value = getattr(opts, name)
        if value is None:
            continue
        if name == "host":
            if not isinstance(value, str) or not value:
                raise TypeError(f"host must be a non-empty str, got {value!r}")
        elif name == "timeout":
            if isinstance(value, bool) or not isinstance(value, (numbers.Real, timedelta)):
                raise TypeError(f"timeout must be seconds or a timedelta, got "
                                f"{type(value).__name__}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
        elif value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


# ---- process-wide settings ---------------------------------------------------------------------

_device_filter: list[str] = []


def set_host_ip(host_ip: str) -> None:
    """Listen for data-plane connections on `host_ip` in groups created after this call.

    Implemented through `$ELASTICPG_HOST` (so processes started afterwards inherit it); a
    group's own `host` option still takes precedence. elasticpg listens on IPv4 addresses.
    """
    if not isinstance(host_ip, str) or not host_ip.strip():
        raise TypeError(f"set_host_ip expects a non-empty str, got {host_ip!r}")
    host_ip = host_ip.strip()
    try:
        addr = ipaddress.ip_address(host_ip)
    except ValueError:
        try:
            socket.getaddrinfo(host_ip, None, socket.AF_INET)
        except OSError as e:
            raise ValueError(f"set_host_ip: cannot resolve {host_ip!r} to an IPv4 address: "
                             f"{e}") from None
    else:
        if addr.version != 4:
            raise ValueError(f"set_host_ip: {host_ip!r} is an IPv6 address; elasticpg's data "
                             f"plane listens on IPv4")
    os.environ[HOST_ENV] = host_ip


def set_device_filter(filters: Iterable[str] | str) -> None:
    """Accepted for compatibility and recorded (see `get_device_filter`); a no-op, since there
    are no RDMA devices to choose among: elasticpg's data plane is TCP."""
    if isinstance(filters, str):
        filters = [filters]
    try:
        names = list(filters)
    except TypeError:
        raise TypeError(f"set_device_filter expects a list of device names, got "
                        f"{type(filters).__name__}") from None
    bad = [f for f in names if not isinstance(f, str)]
    if bad:
        raise TypeError(f"set_device_filter expects device names (str), got {bad!r}")
    _device_filter[:] = names


def get_device_filter() -> list[str]:
    """What `set_device_filter` recorded (elasticpg-only)."""
    return list(_device_filter)


# ---- backend names and the `mooncake` module alias ---------------------------------------------

def register_backend(name: str = CPU_BACKEND_NAME) -> None:
    """Make `dist.init_process_group(name)` (e.g. "mooncake-cpu") use elasticpg. Idempotent."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend name must be a non-empty str, got {name!r}")
    registration.register_backend(name, _create)


def deactivate_ranks(backend: object | None, ranks: object) -> ProposalResult:
    """As `elasticpg.deactivate_ranks`, except that a rank naming only itself leaves alone, as
    in the reference (the others do not call it; they apply the view like a failure at their
    next boundary); it may then destroy its group and a replacement may take the slot."""
    rt = runtime_of(backend)
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.flatten().tolist()
    if [int(r) for r in ([ranks] if isinstance(ranks, numbers.Integral) else ranks)] == [rt.rank]:
        return ProposalResult(ProposalStatus.Applied, rt.leave().epoch)
    return _deactivate_collectively(backend, ranks)


def _create(dist_opts, pg_options) -> ElasticProcessGroup:
    """The reference's defaults for a group created without pg_options: spare slots
    (LEGACY_CAPACITY), and a rank that declares a larger world than the live group's founders
    (its rank beyond them) joins as a scale-up: it is built as an extension and joins before
    init_process_group returns, admitted by the members' extend_group_size_to."""
    if pg_options is not None:
        return registration.create(dist_opts, pg_options)
    rank, world = dist_opts.group_rank, dist_opts.group_size
    founders = _live_founders(dist_opts.store)
    scale_up = founders is not None and founders <= rank < world
    options = Options(max_group_size=max(world, LEGACY_CAPACITY), is_extension=scale_up)
    group = registration.create(dist_opts, options)
    if scale_up:
        join_group(group)
    return group


def _live_founders(store) -> int | None:
    """The founding world size of a group that already exists in `store` (no wait)."""
    if not store.check(["founders"]):
        return None
    return int(store.get("founders"))


_ALIAS_MARK = "__elasticpg_alias__"


def install_alias(backend_names: Iterable[str] = (CPU_BACKEND_NAME,)) -> bool:
    """Let `from mooncake import pg` / `import mooncake.pg` find this module, and register
    elasticpg under `backend_names` (default "mooncake-cpu"; add "mooncake" for code that
    names the GPU backend). Only when no real `mooncake` package is importable: then nothing
    is changed and False is returned. Idempotent; True when the alias is in place."""
    names = [backend_names] if isinstance(backend_names, str) else list(backend_names)
    existing = sys.modules.get("mooncake")
    if existing is None:
        if importlib.util.find_spec("mooncake") is not None:
            return False
        package = types.ModuleType("mooncake", "Alias installed by elasticpg.compat.mooncake: "
                                               "`mooncake.pg` is elasticpg.compat.mooncake.")
        package.__path__ = []  # a package, so that `import mooncake.pg` works
        package.pg = sys.modules[__name__]
        setattr(package, _ALIAS_MARK, True)
        sys.modules["mooncake"] = package
        sys.modules["mooncake.pg"] = sys.modules[__name__]
        from . import mooncake_ep  # Mooncake EP's names (elasticpg.ep)

        package.ep = package.mooncake_ep_buffer = mooncake_ep
        sys.modules["mooncake.ep"] = sys.modules["mooncake.mooncake_ep_buffer"] = mooncake_ep
    elif not getattr(existing, _ALIAS_MARK, False):
        return False
    for name in names:
        register_backend(name)
    return True


def uninstall_alias() -> None:
    """Remove the `mooncake` / `mooncake.pg` entries that `install_alias` put in sys.modules
    (backend names stay registered: torch.distributed cannot unregister them)."""
    if getattr(sys.modules.get("mooncake"), _ALIAS_MARK, False):
        del sys.modules["mooncake"]
        if sys.modules.get("mooncake.pg") is sys.modules[__name__]:
            del sys.modules["mooncake.pg"]
        for sub in ("mooncake.ep", "mooncake.mooncake_ep_buffer"):
            if getattr(sys.modules.get(sub), "__name__", "") == f"{__package__}.mooncake_ep":
                del sys.modules[sub]


__all__ = [
    "CPU_BACKEND_NAME", "MooncakeBackendOptions", "ProposalResult", "ProposalStatus",
    "ProposeViewUpdateResponse", "SyncAfterFailureResponse", "SyncAfterFailureResult",
    "SyncAfterFailureStatus", "ViewUpdateStatus", "activate_ranks", "deactivate_ranks",
    "extend_group_size_to", "get_active_ranks", "get_current_epoch", "get_device_filter",
    "get_failed_ranks_hint", "get_local_success", "get_num_synced_ranks", "get_peer_state",
    "install_alias", "join_group", "recover_ranks", "register_backend", "set_device_filter",
    "set_host_ip", "sync_after_failure", "uninstall_alias",
]
