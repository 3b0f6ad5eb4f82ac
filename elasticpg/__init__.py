"""elasticpg: a fault-tolerant, elastic collective-communication backend for PyTorch.

`import elasticpg` registers the torch.distributed backend "elasticpg".
"""

from __future__ import annotations

import logging

from .api import (
    ProposalResult,
    ProposalStatus,
    SyncAfterFailureResult,
    SyncAfterFailureStatus,
    activate_ranks,
    admit_ready_ranks,
    deactivate_ranks,
    extend_group_size_to,
    get_active_ranks,
    get_current_epoch,
    get_failed_ranks_hint,
    get_local_success,
    get_num_synced_ranks,
    get_peer_state,
    is_replacement,
    join_group,
    metrics,
    metrics_endpoint,
    recover_ranks,
    sync_after_failure,
)
from .control.etcd_store import EtcdStore, register_rendezvous
from .errors import (
    CollectiveMismatchError,
    ElasticPGError,
    GroupStateError,
    OperationTimeoutError,
    PeerFailedError,
)
from .events import configure_from_env, log_events
from .options import Options
from .torch_binding.process_group import BACKEND_NAME, ElasticProcessGroup
from .torch_binding.registration import register_backend

register_backend(BACKEND_NAME)
register_rendezvous()  # init_method="etcd://host:port,.../prefix"
# A library logs, the application decides where to: nothing is printed unless it asks
# (logging.basicConfig, elasticpg.log_events, or ELASTICPG_LOG=json|text).
logging.getLogger("elasticpg").addHandler(logging.NullHandler())
configure_from_env()

__all__ = [
    "BACKEND_NAME", "CollectiveMismatchError", "ElasticPGError", "ElasticProcessGroup",
    "GroupStateError", "OperationTimeoutError", "Options", "PeerFailedError", "ProposalResult",
    "ProposalStatus", "SyncAfterFailureResult", "SyncAfterFailureStatus", "deactivate_ranks",
    "get_active_ranks", "get_current_epoch", "get_failed_ranks_hint", "get_local_success",
    "register_backend", "sync_after_failure", "activate_ranks", "recover_ranks",
    "extend_group_size_to", "get_num_synced_ranks", "get_peer_state", "join_group",
    "log_events", "admit_ready_ranks", "is_replacement", "metrics", "metrics_endpoint",
]
__all__ += ["EtcdStore"]
