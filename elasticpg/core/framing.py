"""Wire framing: one fixed-size header in front of every data-plane payload.

Every message says what operation it belongs to (kind, sequence number, epoch, step) and what it
carries (dtype, element count, root, reduce op). The receiver compares that against the
operation it is running itself, so mismatched calls across ranks become a clear exception instead
of a hang or garbage (gloo silently accepts a mismatched shape; we must not).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .slot_masks import mask_of, ranks_of

MAGIC = 0xE1A5


class MsgType(enum.IntEnum):
    COLL = 1  # a step of a collective, keyed by (epoch, seq, step)
    P2P = 2  # a point-to-point message, matched by (src, tag) in FIFO order
    ABORT = 3  # "collective seq N failed here, because ...": payload is a UTF-8 reason
    HEARTBEAT = 4  # liveness probe; carries nothing
    GOODBYE = 5  # orderly close: the peer is leaving, not crashing
    VIEW = 6  # "a new view was decided": `epoch` is its epoch, the payload its active slots
    JOIN = 7  # a joiner (in join_group) asks to be activated; payload: its JoinPayload
    P2P_ACK = 8  # "your P2P message `seq` reached this process": a send completes on it


class OpKind(enum.IntEnum):
    NONE = 0
    BROADCAST = 1
    ALLREDUCE = 2
    REDUCE = 3
    ALLGATHER = 4
    ALLGATHER_INTO_TENSOR = 5
    REDUCE_SCATTER = 6
    REDUCE_SCATTER_TENSOR = 7
    ALLTOALL = 8
    ALLTOALL_SINGLE = 9
    GATHER = 10
    SCATTER = 11
    BARRIER = 12
    SEND = 13
    MEMBERSHIP = 14  # the exchange inside activate_ranks / deactivate_ranks


# Above this, a header's byte count cannot be real: the link is corrupt (or the peer hostile).
MAX_PAYLOAD = 1 << 40

# magic, type, kind, dtype, redop, src, epoch, seq, step, numel, root, tag, nbytes, ready
_HEADER = struct.Struct("<HBBBBiIQIQiqQQ")
HEADER_SIZE = _HEADER.size


class FramingError(ValueError):
    """The bytes on the wire are not an elasticpg frame (corruption or a foreign peer)."""


@dataclass(frozen=True, slots=True)
class Header:
    type: MsgType
    src: int
    nbytes: int
    kind: OpKind = OpKind.NONE
    dtype: int = 0
    redop: int = 0
    epoch: int = 0
    seq: int = 0
    step: int = 0
    numel: int = 0
    root: int = -1
    tag: int = 0
    ready: int = 0  # digest of the joiners the sender has seen ready (core.group_state)

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC, self.type, self.kind, self.dtype, self.redop, self.src, self.epoch,
            self.seq, self.step, self.numel, self.root, self.tag, self.nbytes, self.ready,
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Header:
        if len(buf) != HEADER_SIZE:
            raise FramingError(f"header must be {HEADER_SIZE} bytes, got {len(buf)}")
        (magic, typ, kind, dtype, redop, src, epoch, seq, step, numel, root, tag,
         nbytes, ready) = _HEADER.unpack(buf)
        if magic != MAGIC:
            raise FramingError(f"bad magic 0x{magic:04x}")
        if nbytes > MAX_PAYLOAD:
            raise FramingError(f"frame claims {nbytes} payload bytes (limit {MAX_PAYLOAD})")
        mtype, okind = _MSG_TYPES.get(typ), _OP_KINDS.get(kind)
        if mtype is None or okind is None:  # dict lookups: an enum call costs a microsecond
            bad = f"{typ} is not a valid MsgType" if mtype is None else \
                f"{kind} is not a valid OpKind"
            raise FramingError(bad)
        return cls(mtype, src, nbytes, okind, dtype, redop, epoch, seq, step, numel, root, tag,
                   ready)


_MSG_TYPES = {m.value: m for m in MsgType}
_OP_KINDS = {k.value: k for k in OpKind}


# ---- payloads of membership frames ---------------------------------------------------------
_JOIN = struct.Struct("<QQ")  # incarnation, attempt


def pack_join(incarnation: int, attempt: int) -> bytes:
    return _JOIN.pack(incarnation, attempt)


def unpack_join(payload: bytes | bytearray | memoryview) -> tuple[int, int]:
    if len(payload) != _JOIN.size:
        raise FramingError(f"JOIN payload must be {_JOIN.size} bytes, got {len(payload)}")
    return _JOIN.unpack(payload)


def pack_slots(slots: Iterable[int]) -> bytes:
    """A set of slots as a little-endian bit set (any number of slots)."""
    bits = mask_of(slots)
    return bits.to_bytes((bits.bit_length() + 7) // 8, "little")


def unpack_slots(payload: bytes | bytearray | memoryview) -> frozenset[int]:
    return frozenset(ranks_of(int.from_bytes(bytes(payload), "little")))
