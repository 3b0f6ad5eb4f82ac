"""`elasticpg.Options`: what a caller may pass as `pg_options=` (SPEC section 2)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from .core.slot_masks import MAX_SLOTS


@dataclass
class Options:
    """Per-group options.

    max_group_size: slot capacity (default: the declared world size); slots above the world size
        are reserved for scale-up.
    is_extension: this process is a replacement / scale-up rank; its group starts Isolated.
    auto_deactivate_on_failure / auto_sync_on_failure: failure-handling mode (SPEC section 4).
    timeout: bound on each operation (default: the timeout given to init_process_group).
    heartbeat_interval / failure_timeout: liveness probing; a peer silent for failure_timeout is
        declared failed (None: derived from `timeout`, at most 2 s).
    host: address to listen on for data-plane links (default 127.0.0.1 or $ELASTICPG_HOST).
    active_ranks: optional caller-owned int32 tensor kept as a live mirror of the active mask.
    metrics_port / metrics_host: serve this process's metrics in the Prometheus text format
        (needs the `metrics` extra; 0: any free port; default $ELASTICPG_METRICS_PORT, unset:
        no endpoint) on metrics_host (default 127.0.0.1 or $ELASTICPG_METRICS_HOST).
    """

    max_group_size: int | None = None
    is_extension: bool = False
    auto_deactivate_on_failure: bool = True
    auto_sync_on_failure: bool = True
    timeout: timedelta | float | None = None
    heartbeat_interval: float | None = None
    failure_timeout: float | None = None
    host: str | None = None
    active_ranks: torch.Tensor | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None

    def validate(self, world_size: int) -> None:
        if self.auto_sync_on_failure and not self.auto_deactivate_on_failure:
            raise ValueError("auto_sync_on_failure=True requires auto_deactivate_on_failure=True "
                             "(there is nothing to sync when failures do not change membership)")
        if self.max_group_size is not None and self.max_group_size < world_size:
            raise ValueError(f"max_group_size={self.max_group_size} is smaller than the world "
                             f"size {world_size}")
        if self.active_ranks is not None:
            t = self.active_ranks
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
                raise ValueError("active_ranks must be a 1-D int32 tensor")
            if t.numel() != (self.max_group_size or world_size):
                raise ValueError(f"active_ranks has {t.numel()} entries, the group has "
                                 f"{self.max_group_size or world_size} slots")
        if self.timeout is not None and self.timeout_seconds() <= 0:
            raise ValueError("timeout must be positive")
        for name in ("failure_timeout", "heartbeat_interval"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.metrics_port is not None and not (
                isinstance(self.metrics_port, int) and 0 <= self.metrics_port <= 65535):
            raise ValueError(f"metrics_port must be a port number, got {self.metrics_port!r}")
        if (self.max_group_size or world_size) > MAX_SLOTS:
            raise ValueError(f"elasticpg groups have at most {MAX_SLOTS} slots, got "
                             f"{self.max_group_size or world_size} (shared-memory control "
                             f"regions and views grow with the slot count)")

    def timeout_seconds(self) -> float | None:
        if self.timeout is None:
            return None
        if isinstance(self.timeout, timedelta):
            return self.timeout.total_seconds()
        return float(self.timeout)


def positive_env(name: str, unit: str, parse: Callable[[str], float] = float) -> float | None:
    """$name as a positive number, None when unset: settings an operator tunes for a machine
    without changing code (a bad value is a clear error, never silently ignored)."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of {unit}, got {raw!r}")
    return value
