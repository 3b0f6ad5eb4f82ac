"""Wire header: layout, full-range round-trips and rejection of foreign or corrupt frames."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticpg.core.framing import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    FramingError,
    Header,
    MsgType,
    OpKind,
    pack_join,
    pack_slots,
    unpack_join,
    unpack_slots,
)

FAST = settings(max_examples=100, deadline=None)

# Field order of the header after the 2-byte magic, with its struct code.
_LAYOUT = "<HBBBBiIQIQiqQQ"


def _ints(code: str) -> st.SearchStrategy[int]:
    bits = struct.calcsize("<" + code) * 8
    if code.islower():
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


headers = st.builds(
    Header,
    type=st.sampled_from(list(MsgType)),
    src=_ints("i"),
    nbytes=st.integers(0, MAX_PAYLOAD),
    kind=st.sampled_from(list(OpKind)),
    dtype=_ints("B"),
    redop=_ints("B"),
    epoch=_ints("I"),
    seq=_ints("Q"),
    step=_ints("I"),
    numel=_ints("Q"),
    root=_ints("i"),
    tag=_ints("q"),
    ready=_ints("Q"),
)


def _raw(**fields: int) -> bytes:
    """A header built field by field with struct directly (independent of Header.pack)."""
    vals = dict(magic=MAGIC, type=int(MsgType.COLL), kind=int(OpKind.ALLREDUCE), dtype=0,
                redop=0, src=0, epoch=0, seq=0, step=0, numel=0, root=-1, tag=0, nbytes=0,
                ready=0)
    vals.update(fields)
    order = ["magic", "type", "kind", "dtype", "redop", "src", "epoch", "seq", "step", "numel",
             "root", "tag", "nbytes", "ready"]
    return struct.pack(_LAYOUT, *(vals[k] for k in order))


def test_header_size_is_fixed_wire_layout():
    assert HEADER_SIZE == 62
    assert HEADER_SIZE == struct.calcsize(_LAYOUT)


def test_magic_leads_the_frame_little_endian():
    raw = Header(MsgType.HEARTBEAT, src=3, nbytes=0).pack()
    assert len(raw) == HEADER_SIZE
    assert raw[:2] == bytes([MAGIC & 0xFF, MAGIC >> 8]) == b"\xa5\xe1"


def test_pack_matches_independent_struct_layout():
    h = Header(MsgType.COLL, src=7, nbytes=4096, kind=OpKind.REDUCE_SCATTER, dtype=12, redop=4,
               epoch=9, seq=123456789012, step=3, numel=1024, root=2, tag=-5)
    expected = _raw(type=1, kind=6, dtype=12, redop=4, src=7, epoch=9, seq=123456789012, step=3,
                    numel=1024, root=2, tag=-5, nbytes=4096)
    assert h.pack() == expected


def test_defaults_round_trip():
    h = Header(MsgType.GOODBYE, src=1, nbytes=0)
    assert (h.kind, h.dtype, h.redop, h.epoch, h.seq, h.step, h.numel, h.root, h.tag) == (
        OpKind.NONE, 0, 0, 0, 0, 0, 0, -1, 0)
    back = Header.unpack(h.pack())
    assert back == h
    assert back.root == -1


@FAST
@given(headers)
def test_pack_unpack_round_trip_over_full_field_ranges(h):
    raw = h.pack()
    assert len(raw) == HEADER_SIZE
    back = Header.unpack(raw)
    assert back == h
    assert type(back.type) is MsgType
    assert type(back.kind) is OpKind


@settings(max_examples=50, deadline=None)
@given(headers, st.sampled_from([bytes, bytearray, memoryview]))
def test_unpack_accepts_any_buffer_type(h, wrap):
    raw = h.pack()
    buf = wrap(bytearray(raw)) if wrap is memoryview else wrap(raw)
    assert Header.unpack(buf) == h


def test_extreme_values_round_trip():
    h = Header(MsgType.P2P, src=-(2**31), nbytes=MAX_PAYLOAD, kind=OpKind.SEND, dtype=255,
               redop=255, epoch=2**32 - 1, seq=2**64 - 1, step=2**32 - 1, numel=2**64 - 1,
               root=2**31 - 1, tag=-(2**63))
    assert Header.unpack(h.pack()) == h


@pytest.mark.parametrize("field,value", [
    ("src", 2**31), ("src", -(2**31) - 1), ("nbytes", -1), ("nbytes", 2**64), ("dtype", 256),
    ("redop", -1), ("epoch", 2**32), ("epoch", -1), ("seq", 2**64), ("step", 2**32),
    ("numel", -1), ("root", 2**31), ("tag", 2**63),
])
def test_pack_refuses_out_of_range_fields_instead_of_truncating(field, value):
    h = dataclasses.replace(Header(MsgType.COLL, src=0, nbytes=0), **{field: value})
    with pytest.raises(struct.error):
        h.pack()


@pytest.mark.parametrize("n", [0, 1, HEADER_SIZE - 1, HEADER_SIZE + 1, 2 * HEADER_SIZE])
def test_unpack_rejects_wrong_length(n):
    good = Header(MsgType.COLL, src=0, nbytes=0).pack()
    buf = (good * 3)[:n]
    with pytest.raises(FramingError, match="header must be"):
        Header.unpack(buf)


@FAST
@given(st.integers(0, 0xFFFF).filter(lambda m: m != MAGIC))
def test_unpack_rejects_bad_magic(magic):
    with pytest.raises(FramingError, match="bad magic"):
        Header.unpack(_raw(magic=magic))


def test_unpack_rejects_byte_swapped_magic():
    raw = bytearray(Header(MsgType.COLL, src=0, nbytes=0).pack())
    raw[0], raw[1] = raw[1], raw[0]
    with pytest.raises(FramingError):
        Header.unpack(bytes(raw))


_KNOWN_TYPES = {int(t) for t in MsgType}
_KNOWN_KINDS = {int(k) for k in OpKind}


def test_unpack_rejects_every_unknown_message_type():
    unknown = sorted(set(range(256)) - _KNOWN_TYPES)
    assert 0 in unknown and 255 in unknown
    for typ in unknown:
        with pytest.raises(FramingError):
            Header.unpack(_raw(type=typ))
    for typ in _KNOWN_TYPES:
        assert Header.unpack(_raw(type=typ)).type == typ


def test_unpack_rejects_every_unknown_op_kind():
    unknown = sorted(set(range(256)) - _KNOWN_KINDS)
    assert unknown[0] == max(_KNOWN_KINDS) + 1
    for kind in unknown:
        with pytest.raises(FramingError):
            Header.unpack(_raw(kind=kind))
    for kind in _KNOWN_KINDS:
        assert Header.unpack(_raw(kind=kind)).kind == kind


def test_known_enum_values_are_stable():
    # These numbers are on the wire: renumbering them breaks mixed-version peers.
    # New values may be appended; existing ones keep their numbers.
    fixed_types = {"COLL": 1, "P2P": 2, "ABORT": 3, "HEARTBEAT": 4, "GOODBYE": 5}
    assert {t.name: int(t) for t in MsgType if t.name in fixed_types} == fixed_types
    assert all(int(t) > 5 for t in MsgType if t.name not in fixed_types)
    fixed_kinds = ["NONE", "BROADCAST", "ALLREDUCE", "REDUCE", "ALLGATHER",
                   "ALLGATHER_INTO_TENSOR", "REDUCE_SCATTER", "REDUCE_SCATTER_TENSOR", "ALLTOALL",
                   "ALLTOALL_SINGLE", "GATHER", "SCATTER", "BARRIER", "SEND"]
    assert [k.name for k in OpKind][:len(fixed_kinds)] == fixed_kinds
    assert [int(k) for k in OpKind] == list(range(len(OpKind)))
    assert all(0 < int(t) < 256 for t in MsgType)
    assert all(0 <= int(k) < 256 for k in OpKind)  # both travel as one byte


def test_an_absurd_payload_size_is_a_framing_error():
    # a corrupt (or hostile) header must fail the link, not make the reader allocate 2**64 bytes
    raw = Header(MsgType.COLL, src=0, nbytes=MAX_PAYLOAD + 1).pack()
    with pytest.raises(FramingError, match="payload bytes"):
        Header.unpack(raw)


@given(st.sets(st.integers(0, 1500), max_size=40))
def test_slot_sets_round_trip_for_any_number_of_slots(slots):
    assert unpack_slots(pack_slots(slots)) == frozenset(slots)


@given(_ints("Q"), _ints("Q"))
def test_join_payload_round_trip(incarnation, attempt):
    assert unpack_join(pack_join(incarnation, attempt)) == (incarnation, attempt)
    with pytest.raises(FramingError):
        unpack_join(pack_join(incarnation, attempt)[:-1])


def test_framing_error_is_a_value_error():
    assert issubclass(FramingError, ValueError)
    with pytest.raises(ValueError):
        Header.unpack(b"")


def test_header_is_immutable():
    h = Header(MsgType.COLL, src=0, nbytes=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.seq = 5  # type: ignore[misc]
