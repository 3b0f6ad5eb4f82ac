"""Collective algorithms over an abstract per-operation context (no sockets here)."""
