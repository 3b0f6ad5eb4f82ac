"""Exceptions raised at the caller. All derive from torch's DistBackendError (a RuntimeError), so
code that catches torch.distributed errors catches ours too."""

from __future__ import annotations

import torch.distributed as dist


class ElasticPGError(dist.DistBackendError):
    """Base class of every elasticpg error."""


class CollectiveMismatchError(ElasticPGError):
    """Ranks called different collectives, or the same one with different shapes/dtypes/roots."""


class PeerFailedError(ElasticPGError):
    """A peer this operation depends on failed (crashed, hung past the bound, or left)."""

    def __init__(self, ranks: list[int], reason: str) -> None:
        super().__init__(f"peer rank(s) {ranks} failed: {reason}")
        self.ranks = ranks


class OperationTimeoutError(ElasticPGError):
    """An operation did not complete within its timeout."""


class GroupStateError(ElasticPGError):
    """The group cannot run this call now: destroyed, quiescing, or this rank is not active."""


class ControlPlaneError(ElasticPGError):
    """The group's store could not be reached or failed a request (membership cannot change
    until it answers again)."""
