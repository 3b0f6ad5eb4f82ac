"""Algorithm schedules: who sends what to whom, as plain numbers.

The collectives layer turns these into transfers. Keeping them pure lets the tests check every
(rank, group) combination without processes.
"""

from __future__ import annotations

from collections.abc import Sequence


def peer_order(me: int, ranks: Sequence[int]) -> list[int]:
    """Everyone but `me`, starting after `me` and wrapping around.

    Each rank walks the ring from its own position, so in every round of a direct exchange rank
    i talks to i+k: no receiver is the target of all senders at once.
    """
    if me not in ranks:
        raise ValueError(f"rank {me} is not in {list(ranks)}")
    i = list(ranks).index(me)
    n = len(ranks)
    return [ranks[(i + k) % n] for k in range(1, n)]


def even_splits(numel: int, parts: int) -> list[tuple[int, int]]:
    """(offset, count) of `parts` contiguous slices of `numel` elements, as even as possible."""
    if parts <= 0:
        raise ValueError("parts must be positive")
    base, extra = divmod(numel, parts)
    out, off = [], 0
    for i in range(parts):
        cnt = base + (1 if i < extra else 0)
        out.append((off, cnt))
        off += cnt
    return out


def split_offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, count) for consecutive slices of the given sizes (uneven all_to_all)."""
    out, off = [], 0
    for s in sizes:
        if s < 0:
            raise ValueError(f"split sizes must be non-negative, got {list(sizes)}")
        out.append((off, s))
        off += s
    return out

