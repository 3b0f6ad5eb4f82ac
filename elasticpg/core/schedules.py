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


SPLIT_ALLREDUCE_FROM = 1 << 20  # bytes: from here (and > 2 ranks), all_reduce over TCP runs as
# reduce-scatter + all-gather. Each rank then sends 2(n-1)/n of the tensor instead of n-1
# copies of it, for two more rounds of frames: at 4 ranks over veth the direct exchange was
# faster at 512 KiB, even at 1 MiB, the split from 2 MiB. At 2 ranks it moves the same bytes as
# the direct exchange and measured slower at 1-64 MiB (README, across hosts): not used there


def split_allreduce(nbytes: int, numel: int, ranks: int) -> list[tuple[int, int]] | None:
    """The slice (offset, count) each participant (by index) reduces when a TCP all_reduce runs
    as reduce-scatter + all-gather, or None for the direct exchange.

    Decided from the op's own arguments and the number of participants only, so every member
    of a view picks the same algorithm (a rank that picked the other would see a frame of the
    wrong size: a mismatch, or view lag while views differ).
    """
    if ranks <= 2 or nbytes < SPLIT_ALLREDUCE_FROM or numel < ranks:
        return None
    return even_splits(numel, ranks)


PIPELINE_CHUNK = 16 << 20  # bytes: a split all_reduce moves each slice in chunks of at most
# about this size, so a reducer reduces chunk k while chunk k+1 is on the wire and sends each
# reduced chunk as soon as it is done. Large on purpose: over veth on 2 shared cores every
# chunk is one more wake-up of each rank, and 1 MiB and 4 MiB chunks measured slower than
# none (README, across hosts); on real links the constant is worth measuring again


def pipeline_chunks(slices: Sequence[tuple[int, int]],
                    itemsize: int) -> list[list[tuple[int, int]]]:
    """Each slice of a split all_reduce cut into chunks (absolute offset, count): the same
    number of chunks for every slice, none empty (an empty frame is the reducer's "incomplete"
    mark), about PIPELINE_CHUNK bytes each.

    Like split_allreduce, decided from the op's arguments and the participant count only."""
    if not slices or itemsize <= 0:
        raise ValueError("need slices and a positive item size")
    largest = max(c for _o, c in slices)
    smallest = min(c for _o, c in slices)
    if smallest <= 0:
        raise ValueError(f"empty slice in {list(slices)}")
    chunks = max(1, min(-(-largest * itemsize // PIPELINE_CHUNK), smallest))
    return [[(o + co, cc) for co, cc in even_splits(c, chunks)] for o, c in slices]


SPLIT_BROADCAST_FROM = 16 << 20  # bytes: above (and > 2 ranks), broadcast over TCP runs as
# scatter + all-gather: the root sends the tensor once (a slice to each rank) instead of once
# per rank, and the ranks pass the slices on among themselves, so no one sender carries it all
# (measured: README, across hosts)


def split_broadcast(nbytes: int, numel: int, ranks: int) -> list[tuple[int, int]] | None:
    """The slice (offset, count) each non-root participant (by index among the non-roots)
    receives from the root when a TCP broadcast runs as scatter + all-gather, or None for the
    direct one. Like split_allreduce, decided from the op and the participant count only."""
    if ranks <= 2 or nbytes < SPLIT_BROADCAST_FROM or numel < ranks - 1:
        return None
    return even_splits(numel, ranks - 1)
