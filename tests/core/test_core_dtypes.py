"""Dtype wire codes: a fixed table, total on supported dtypes, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from elasticpg.core.dtypes import (
    SUPPORTED_DTYPES,
    dtype_code,
    dtype_name,
    is_integral,
)

# The wire table, written out by hand: a reordering of dtypes._NAMES must fail here.
EXPECTED_CODES = {
    "bool": 1, "uint8": 2, "int8": 3, "int16": 4, "int32": 5, "int64": 6, "uint16": 7,
    "uint32": 8, "uint64": 9, "float16": 10, "bfloat16": 11, "float32": 12, "float64": 13,
    "complex32": 14, "complex64": 15, "complex128": 16, "float8_e4m3fn": 17, "float8_e5m2": 18,
    "float8_e4m3fnuz": 19, "float8_e5m2fnuz": 20, "float8_e8m0fnu": 21,
}

# Every integer and float type torch has on CPU must be supported (SPEC section 2).
REQUIRED = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
            torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
            torch.float32, torch.float64]


def test_codes_match_the_fixed_wire_table():
    for name, code in EXPECTED_CODES.items():
        dt = getattr(torch, name, None)
        if dt is None:
            continue
        assert dtype_code(dt) == code, name
        assert dtype_name(code) == name


def test_required_dtypes_are_supported():
    for dt in REQUIRED:
        assert dt in SUPPORTED_DTYPES, dt
    # torch 2.13 has all the float8 flavours and complex32: all of them are on the table
    assert len(SUPPORTED_DTYPES) == sum(hasattr(torch, n) for n in EXPECTED_CODES)


@pytest.mark.parametrize("dt", SUPPORTED_DTYPES, ids=str)
def test_round_trip_and_codes_fit_in_a_header_byte(dt):
    code = dtype_code(dt)
    assert 1 <= code <= 255  # the header's dtype field is one unsigned byte; 0 means "none"
    assert dtype_name(code) == str(dt).removeprefix("torch.")


def test_codes_are_unique():
    codes = [dtype_code(dt) for dt in SUPPORTED_DTYPES]
    assert len(set(codes)) == len(codes)
    assert len(set(SUPPORTED_DTYPES)) == len(SUPPORTED_DTYPES)


_UNSUPPORTED = [getattr(torch, n) for n in (
    "quint8", "qint8", "qint32", "quint4x2", "bits8", "bits16", "float4_e2m1fn_x2",
    "uint1", "uint3", "int4") if isinstance(getattr(torch, n, None), torch.dtype)]


@pytest.mark.parametrize("dt", _UNSUPPORTED, ids=str)
def test_unsupported_dtype_is_a_type_error(dt):
    assert dt not in SUPPORTED_DTYPES
    with pytest.raises(TypeError, match="does not support dtype"):
        dtype_code(dt)


def test_non_dtype_is_a_type_error():
    with pytest.raises(TypeError):
        dtype_code("float32")  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [0, -1, 22, 100, 255, 256, 2**40])
def test_unknown_code_is_named_as_such(code):
    assert dtype_name(code) == f"<code {code}>"


def test_every_unused_byte_code_is_named_unknown():
    used = {dtype_code(dt) for dt in SUPPORTED_DTYPES}
    for code in range(256):
        if code not in used:
            assert dtype_name(code) == f"<code {code}>"


@pytest.mark.parametrize("dt", SUPPORTED_DTYPES, ids=str)
def test_is_integral(dt):
    integral = dt == torch.bool or dt in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                          torch.int64, torch.uint16, torch.uint32, torch.uint64)
    assert is_integral(dt) is integral


def test_float8_and_complex_are_not_integral():
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "complex32", "complex64"):
        assert not is_integral(getattr(torch, name))
