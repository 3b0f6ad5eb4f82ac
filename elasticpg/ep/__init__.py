"""Expert parallelism: MoE dispatch/combine (`Buffer`) that keeps serving when a rank dies.

The programming model is the reference's (Mooncake EP, DeepEP low-latency); see buffer.py for
the failure rules and layout.py for the routing math.
"""

from .buffer import Buffer, DispatchHandle, EventOverlap
from .layout import EPConfigError, EPMismatchError

get_ep_buffer_size_hint = Buffer.get_ep_buffer_size_hint

__all__ = ["Buffer", "DispatchHandle", "EPConfigError", "EPMismatchError", "EventOverlap",
           "get_ep_buffer_size_hint"]
