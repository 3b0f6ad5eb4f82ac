"""Registering elasticpg with torch.distributed under one or more backend names."""

from __future__ import annotations

import torch.distributed as dist

from ..options import Options
from .process_group import BACKEND_NAME, ElasticProcessGroup

_registered: set[str] = set()


def _create(dist_opts, pg_options) -> ElasticProcessGroup:
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
                               dist_opts.timeout, str(dist_opts.group_id), options)


def register_backend(name: str = BACKEND_NAME) -> None:
    """Make `dist.init_process_group(name)` use elasticpg. Idempotent."""
    key = name.lower()
    if key in _registered or name.upper() in dist.Backend._plugins:
        _registered.add(key)
        return
    dist.Backend.register_backend(name, _create, extended_api=True, devices=["cpu", "cuda"])
    _registered.add(key)
