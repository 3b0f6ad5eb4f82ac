"""Sets of slots as bit masks of any length, and how they fit into fixed-size words.

A group has up to MAX_SLOTS slots. A Python int holds a mask of any length; where a mask must
sit in shared memory (int64 control words), it travels as a *key* in one word next to the
descriptor it belongs to, plus, for groups wider than one word, the full mask in
`words_for(slots)` words elsewhere. Up to KEY_EXACT_SLOTS slots the key is the mask itself
(nothing else to read: the small-group path is unchanged); above, it is a fold of the mask that
equal masks share, so a reader compares keys first and the full words only when the keys agree.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# A bound on the slot capacity: control regions and views grow linearly with it.
MAX_SLOTS = 4096
KEY_EXACT_SLOTS = 63  # masks of up to 63 slots fit a signed 64-bit word as they are
_FOLD = (1 << 61) - 1  # a Mersenne prime: the fold is a cheap, well-mixed residue


def mask_of(slots: Iterable[int]) -> int:
    bits = 0
    for r in slots:
        bits |= 1 << r
    return bits


def ranks_of(mask: int) -> list[int]:
    """The set bits of `mask`, ascending."""
    if mask < 0:
        raise ValueError(f"a slot mask is not negative, got {mask}")
    if mask.bit_length() > 64:  # C-level: with 1024 slots, a bit at a time costs 1 ms
        raw = np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), np.uint8)
        return np.flatnonzero(np.unpackbits(raw, bitorder="little")).tolist()
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def words_for(slots: int) -> int:
    """How many 64-bit words hold a mask of `slots` slots."""
    return (slots + 63) // 64


def mask_key(mask: int, slots: int) -> int:
    """The one-word key of `mask` in a group of `slots` slots (non-negative, below 2**63)."""
    return mask if slots <= KEY_EXACT_SLOTS else mask % _FOLD


def mask_bytes(mask: int, slots: int) -> bytes:
    """`mask` as words_for(slots) little-endian 64-bit words."""
    if mask < 0 or mask.bit_length() > slots:
        raise ValueError(f"mask 0x{mask:x} does not fit a group of {slots} slots")
    return mask.to_bytes(8 * words_for(slots), "little")


def mask_from_bytes(raw: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(raw, "little")

