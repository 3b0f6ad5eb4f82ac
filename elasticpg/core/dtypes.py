"""Stable wire codes for torch dtypes, and which reductions each dtype supports.

The code table is fixed (never reordered): it is part of the wire format.
"""

from __future__ import annotations

import torch

_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
]
_BY_CODE: dict[int, torch.dtype] = {}
for _i, _n in enumerate(_NAMES, start=1):
    _dt = getattr(torch, _n, None)
    if isinstance(_dt, torch.dtype):
        _BY_CODE[_i] = _dt
_BY_DTYPE: dict[torch.dtype, int] = {dt: code for code, dt in _BY_CODE.items()}

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_BY_DTYPE)
# element size by wire code (0 and unknown codes: 0), for byte counts without a torch call
ITEMSIZE_BY_CODE: tuple[int, ...] = tuple(
    _BY_CODE[c].itemsize if c in _BY_CODE else 0 for c in range(len(_NAMES) + 1))


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"elasticpg does not support dtype {dtype}") from None


def dtype_name(code: int) -> str:
    dt = _BY_CODE.get(code)
    return str(dt).removeprefix("torch.") if dt is not None else f"<code {code}>"


def is_integral(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)
