"""Registering elasticpg with torch.distributed under one or more backend names.

Replacement hook: a process that `elasticpg run` started to refill a dead worker's slot
(`launcher.environment.is_replacement()`) builds every group it creates before its first
successful `join_group` as an extension (`Options(is_extension=True)`, so it starts Isolated),
whatever `pg_options` the script passed: a script written for torchrun then warms up in
isolation without changing its `init_process_group` / `new_group` calls, and creates the same
subgroups in the same order as its peers did. Groups it creates after joining are ordinary.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from ..launcher.environment import is_replacement
from ..options import Options
from .process_group import BACKEND_NAME, ElasticProcessGroup

_registered: set[str] = set()
_joined = False  # this process completed a join_group (see note_joined)


def note_joined() -> None:
    """Called by `elasticpg.join_group` once a join succeeded: from now on this process's new
    groups are ordinary ones, replacement or not."""
    global _joined
    _joined = True


def _as_replacement(options: Options) -> Options:
    if is_replacement() and not _joined and not options.is_extension:
        return dataclasses.replace(options, is_extension=True)
    return options


def create(dist_opts, pg_options) -> ElasticProcessGroup:
    """The group torch.distributed asks the backend for (`pg_options` as the caller passed)."""
    if pg_options is None:
        options = Options()
    elif isinstance(pg_options, Options):
        options = pg_options
    elif hasattr(pg_options, "to_options"):
        options = pg_options.to_options()
    else:
        raise TypeError(f"pg_options for elasticpg must be elasticpg.Options, got "
                        f"{type(pg_options).__name__}")
    return ElasticProcessGroup(dist_opts.store, dist_opts.group_rank, dist_opts.group_size,
                               dist_opts.timeout, str(dist_opts.group_id),
                               _as_replacement(options))


def register_backend(name: str = BACKEND_NAME, creator=create) -> None:
    """Make `dist.init_process_group(name)` use elasticpg (`creator(dist_opts, pg_options)`
    builds its groups; a compatibility layer passes its own). Idempotent."""
    key = name.lower()
    if key in _registered or name.upper() in dist.Backend._plugins:
        _registered.add(key)
        return
    dist.Backend.register_backend(name, creator, extended_api=True, devices=["cpu", "cuda"])
    _registered.add(key)
