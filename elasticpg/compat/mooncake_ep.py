"""Mooncake EP's Python names on top of elasticpg.ep: what `install_alias` (compat.mooncake)
puts at `mooncake.mooncake_ep_buffer` and `mooncake.ep`, so that code written for the
reference (`from mooncake.mooncake_ep_buffer import Buffer`, `from mooncake.ep import
get_active_ranks`) runs unchanged. Same objects as elasticpg.ep and elasticpg.api."""

from __future__ import annotations

from ..api import get_active_ranks
from ..ep import Buffer, EventOverlap, get_ep_buffer_size_hint

__all__ = ["Buffer", "EventOverlap", "get_active_ranks", "get_ep_buffer_size_hint"]
