"""Reductions: reduce_into against an independent Python/numpy reference, for every supported
(dtype, op) pair, plus op mapping from torch, support checks, AVG semantics and determinism."""

from __future__ import annotations

import functools
import math
import operator
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticpg.core.dtypes import SUPPORTED_DTYPES, is_integral
from elasticpg.core.reduction import Reduce, check_supported, from_torch, reduce_into

BITWISE = (Reduce.BAND, Reduce.BOR, Reduce.BXOR)
SIGNED = {torch.int8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}
UNSIGNED = {torch.uint8: 8, torch.uint16: 16, torch.uint32: 32, torch.uint64: 64}
FLOAT8 = tuple(getattr(torch, n) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n))
REDUCED_FLOAT = (torch.float16, torch.bfloat16)
COMPLEX = tuple(dt for dt in SUPPORTED_DTYPES if dt.is_complex)


def _allowed(op: Reduce, dtype: torch.dtype) -> bool:
    """Independent statement of which pairs make sense (cross-checked with check_supported)."""
    if op in BITWISE:
        return dtype == torch.bool or dtype in SIGNED or dtype in UNSIGNED
    if op in (Reduce.MIN, Reduce.MAX):
        return not dtype.is_complex
    return True


pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

PAIRS = [(dt, op) for dt in SUPPORTED_DTYPES for op in Reduce if _allowed(op, dt)]


def _pair_id(p):
    return f"{str(p[0]).removeprefix('torch.')}-{p[1].name}"


# ---------------------------------------------------------------- op mapping and support


_TORCH_OPS = {
    dist.ReduceOp.SUM: Reduce.SUM, dist.ReduceOp.AVG: Reduce.AVG,
    dist.ReduceOp.PRODUCT: Reduce.PRODUCT, dist.ReduceOp.MIN: Reduce.MIN,
    dist.ReduceOp.MAX: Reduce.MAX, dist.ReduceOp.BAND: Reduce.BAND,
    dist.ReduceOp.BOR: Reduce.BOR, dist.ReduceOp.BXOR: Reduce.BXOR,
}


@pytest.mark.parametrize("torch_op", list(_TORCH_OPS), ids=lambda o: o.name)
def test_from_torch_maps_red_op_types(torch_op):
    assert from_torch(torch_op) is _TORCH_OPS[torch_op]


@pytest.mark.parametrize("torch_op", list(_TORCH_OPS), ids=lambda o: o.name)
def test_from_torch_maps_reduce_op_instances(torch_op):
    # torch.distributed hands the backend ReduceOp objects (opts.reduceOp), not bare enums
    assert from_torch(dist.ReduceOp(torch_op)) is _TORCH_OPS[torch_op]


def test_from_torch_rejects_premul_sum_and_unknown_ops():
    with pytest.raises(ValueError, match="does not support reduce op"):
        from_torch(dist.ReduceOp.PREMUL_SUM)
    with pytest.raises(ValueError, match="does not support reduce op"):
        from_torch(dist._make_nccl_premul_sum(2.0))
    for bogus in ("SUM", None, object(), 8, 99, -1):
        with pytest.raises(ValueError):
            from_torch(bogus)


def test_reduce_codes_are_stable():
    # the header carries the op as a byte: these numbers are on the wire
    assert [(o.name, int(o)) for o in Reduce] == [
        ("SUM", 0), ("AVG", 1), ("PRODUCT", 2), ("MIN", 3), ("MAX", 4), ("BAND", 5),
        ("BOR", 6), ("BXOR", 7)]


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=str)
def test_check_supported_matrix(dtype):
    for op in Reduce:
        if _allowed(op, dtype):
            check_supported(op, dtype)
        else:
            with pytest.raises(ValueError, match=op.name):
                check_supported(op, dtype)


def test_check_supported_messages():
    with pytest.raises(ValueError, match="bitwise reduce op BAND needs an integer or bool"):
        check_supported(Reduce.BAND, torch.float32)
    with pytest.raises(ValueError, match="bitwise"):
        check_supported(Reduce.BXOR, torch.bfloat16)
    with pytest.raises(ValueError, match="bitwise"):
        check_supported(Reduce.BOR, torch.complex64)
    with pytest.raises(ValueError, match="bitwise"):
        check_supported(Reduce.BOR, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="MIN is undefined for complex"):
        check_supported(Reduce.MIN, torch.complex128)
    with pytest.raises(ValueError, match="MAX is undefined for complex"):
        check_supported(Reduce.MAX, torch.complex32)
    check_supported(Reduce.PRODUCT, torch.complex64)
    check_supported(Reduce.AVG, torch.complex64)
    check_supported(Reduce.BXOR, torch.bool)
    check_supported(Reduce.BAND, torch.uint64)


def test_pairs_cover_every_supported_dtype():
    assert {dt for dt, _ in PAIRS} == set(SUPPORTED_DTYPES)
    assert len(PAIRS) == 8 * 9 + 5 * (len(SUPPORTED_DTYPES) - 9 - len(COMPLEX)) + 3 * len(COMPLEX)


# ---------------------------------------------------------------- value generation


def _int_bounds(dtype: torch.dtype, op: Reduce, nparts: int) -> tuple[int, int]:
    if dtype in SIGNED:
        lo, hi = -(2 ** (SIGNED[dtype] - 1)), 2 ** (SIGNED[dtype] - 1) - 1
    else:
        lo, hi = 0, 2 ** UNSIGNED[dtype] - 1
    if op == Reduce.AVG:
        # keep the sum in range: what AVG means when the sum overflows is not pinned down here
        lo, hi = -((-lo) // nparts), hi // nparts
    return lo, hi


_NP_INT = {torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
           torch.int64: np.int64, torch.uint8: np.uint8, torch.uint16: np.uint16,
           torch.uint32: np.uint32, torch.uint64: np.uint64}


def _from_bytes(raw: bytes, dtype: torch.dtype, op: Reduce, nparts: int) -> torch.Tensor:
    """Turn raw random bytes into one contribution of `dtype` (whole bit patterns mostly)."""
    if dtype == torch.bool:
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8) & 1 == 1)
    if dtype in _NP_INT:
        a = np.frombuffer(raw, dtype=_NP_INT[dtype]).copy()
        if op == Reduce.AVG:
            lo, hi = _int_bounds(dtype, op, nparts)
            a = np.clip(a // nparts, lo, hi).astype(_NP_INT[dtype])
        return torch.from_numpy(a)
    if dtype == torch.float16:  # every bit pattern: subnormals, inf and nan included
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float16).copy())
    if dtype == torch.bfloat16:
        bits = np.frombuffer(raw, dtype=np.uint16).copy()
        exp = (bits >> 7) & 0xFF
        # magnitudes below 2**-20 become (signed) zero: products stay clear of float32
        # subnormals, where torch's float32-then-bfloat16 rounding is a double rounding
        bits = np.where(exp < 127 - 20, bits & 0x8000, bits).astype(np.uint16)
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    if dtype == torch.float32:
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
    if dtype == torch.float64:
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float64).copy())
    if dtype in FLOAT8:  # every bit pattern
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(dtype)
    if dtype.is_complex:
        # Gaussian integers in [-4, 4]: sums and products are exact, so is the reference
        comp = (np.frombuffer(raw, dtype=np.uint8) % 9).astype(np.float32) - 4
        return torch.from_numpy(comp.copy()).view(torch.complex64).to(dtype)
    raise AssertionError(f"no generator for {dtype}")  # a new dtype on the table needs one


def _nbytes(dtype: torch.dtype) -> int:
    if dtype.is_complex:
        return 2
    return torch.empty(0, dtype=dtype).element_size()


@st.composite
def tensors(draw, dtype: torch.dtype, op: Reduce, nparts: int, n: int) -> list[torch.Tensor]:
    k = n * _nbytes(dtype)
    raws = draw(st.lists(st.binary(min_size=k, max_size=k), min_size=nparts, max_size=nparts))
    return [_from_bytes(raw, dtype, op, nparts) for raw in raws]


# ---------------------------------------------------------------- the reference


def _wrap(v: int, dtype: torch.dtype) -> int:
    if dtype in SIGNED:
        b = SIGNED[dtype]
        return (v + 2 ** (b - 1)) % 2**b - 2 ** (b - 1)
    return v % 2 ** UNSIGNED[dtype]


def _round_to(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round a float64 array to `dtype` and back (one correctly rounded step)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).to(torch.float64).numpy()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype.is_complex:
        return t.to(torch.complex128).numpy()
    if t.dtype.is_floating_point:
        return t.to(torch.float64).numpy()
    return t.numpy()


_FLOAT_FN = {Reduce.SUM: np.add, Reduce.AVG: np.add, Reduce.PRODUCT: np.multiply,
             Reduce.MIN: np.minimum, Reduce.MAX: np.maximum}
_INT_FN = {Reduce.SUM: operator.add, Reduce.AVG: operator.add, Reduce.PRODUCT: operator.mul,
           Reduce.MIN: min, Reduce.MAX: max, Reduce.BAND: operator.and_,
           Reduce.BOR: operator.or_, Reduce.BXOR: operator.xor}


def reference(parts: list[torch.Tensor], op: Reduce) -> np.ndarray:
    """parts[0] op parts[1] op ... left to right, computed without torch arithmetic."""
    dtype, n = parts[0].dtype, len(parts)
    if dtype == torch.bool:
        cols = zip(*(p.tolist() for p in parts), strict=True)
        if op in (Reduce.SUM, Reduce.AVG, Reduce.MAX, Reduce.BOR):
            return np.array([any(c) for c in cols], dtype=bool)
        if op in (Reduce.PRODUCT, Reduce.MIN, Reduce.BAND):
            return np.array([all(c) for c in cols], dtype=bool)
        return np.array([functools.reduce(operator.xor, c) for c in cols], dtype=bool)
    if is_integral(dtype):
        cols = zip(*(p.numpy().tolist() for p in parts), strict=True)
        res = []
        for c in cols:
            v = functools.reduce(_INT_FN[op], c)
            if op == Reduce.AVG:
                q = abs(v) // n
                v = q if v >= 0 else -q  # truncation toward zero; == floor when unsigned
            res.append(_wrap(v, dtype))
        return np.array(res, dtype=object)
    with np.errstate(all="ignore"):
        if dtype in FLOAT8:
            # documented: accumulate in float32, round to float8 once at the end
            acc = parts[0].to(torch.float32).numpy().copy()
            for p in parts[1:]:
                acc = _FLOAT_FN[op](acc, p.to(torch.float32).numpy())
            if op == Reduce.AVG:
                acc = acc / np.float32(n)
            return torch.from_numpy(acc).to(dtype).to(torch.float64).numpy()
        if dtype.is_complex:
            acc = _as_numpy(parts[0]).copy()
            for p in parts[1:]:
                acc = _FLOAT_FN[op](acc, _as_numpy(p))
            if op == Reduce.AVG:
                acc = acc / n
            wide = torch.from_numpy(acc).to(dtype)  # one rounding to the dtype
            return _as_numpy(wide)
        # real floats: every step is rounded to the dtype, as in-dtype arithmetic does
        acc = _as_numpy(parts[0]).copy()
        for p in parts[1:]:
            acc = _round_to(_FLOAT_FN[op](acc, _as_numpy(p)), dtype)
        if op == Reduce.AVG and n > 1:
            acc = _round_to(acc / n, dtype)
        return acc


_COMPLEX_EPS = {torch.complex32: 2.0**-10, torch.complex64: 2.0**-23, torch.complex128: 2.0**-52}


def _assert_matches(out: torch.Tensor, expected: np.ndarray, op: Reduce) -> None:
    got = _as_numpy(out)
    if is_integral(out.dtype):
        assert got.tolist() == expected.tolist()
    elif out.dtype.is_complex and op == Reduce.AVG:
        # torch's complex-by-scalar division is not always correctly rounded (5j/3 is off by
        # one ulp in complex64); everything else on Gaussian integers is exact
        np.testing.assert_allclose(got, expected, rtol=4 * _COMPLEX_EPS[out.dtype], atol=0)
    else:
        np.testing.assert_array_equal(got, expected)  # NaN == NaN, -0.0 == 0.0


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


# ---------------------------------------------------------------- reduce_into vs the reference


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_reduce_into_matches_reference(pair, data):
    dtype, op = pair
    nparts = data.draw(st.integers(1, 5), label="nparts")
    n = data.draw(st.integers(1, 8), label="numel")
    parts = data.draw(tensors(dtype, op, nparts, n), label="parts")
    before = [_bits(p) for p in parts]
    out = torch.empty(n, dtype=dtype)
    reduce_into(out, parts, op)
    _assert_matches(out, reference(parts, op), op)
    assert [_bits(p) for p in parts] == before  # inputs are never modified


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_reduce_into_in_place_and_shaped(pair):
    """out may alias parts[0]; tensors of any shape are reduced elementwise; repeatable bits."""
    dtype, op = pair
    g = torch.Generator().manual_seed(zlib.crc32(_pair_id(pair).encode()))
    parts = []
    for _ in range(4):
        if dtype == torch.bool:
            p = torch.randint(0, 2, (2, 3), generator=g).bool()
        elif is_integral(dtype):
            lo, hi = _int_bounds(dtype, op, 4)
            lo, hi = max(lo, -1000), min(hi, 1000)
            p = torch.randint(lo, hi + 1, (2, 3), generator=g).to(dtype)
        elif dtype.is_complex:
            p = torch.randint(-3, 4, (2, 3, 2), generator=g).float()
            p = torch.view_as_complex(p).to(dtype)
        else:
            p = (torch.randn(2, 3, generator=g) * 4).to(dtype)
        parts.append(p)
    expected = reference([p.reshape(-1) for p in parts], op)

    out = torch.empty(3, 2, dtype=dtype)  # same numel, other shape
    reduce_into(out, parts, op)
    _assert_matches(out.reshape(-1), expected, op)

    again = torch.empty(3, 2, dtype=dtype)
    reduce_into(again, parts, op)
    assert _bits(again) == _bits(out)  # same parts, same order: bit-identical

    inplace = [parts[0].clone()] + parts[1:]
    others = [_bits(p) for p in inplace[1:]]
    reduce_into(inplace[0], inplace, op)
    assert _bits(inplace[0]) == _bits(out)
    assert [_bits(p) for p in inplace[1:]] == others


@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_single_part_is_copied_unchanged(pair):
    dtype, op = pair
    if dtype in FLOAT8:
        src = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    elif dtype == torch.bool:
        src = torch.tensor([True, False, True])
    elif dtype.is_complex:
        src = torch.tensor([1 + 2j, -3.5 + 0.25j, 0j], dtype=torch.complex64).to(dtype)
    elif dtype.is_floating_point:
        src = torch.tensor([1.5, -0.0, 3e-5, 65504.0, -7.25, math.inf], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        src = torch.from_numpy(np.array([info.min, info.max, 0, 1, 7], dtype=_NP_INT[dtype]))
    out = torch.empty_like(src)
    reduce_into(out, [src], op)
    np.testing.assert_array_equal(_as_numpy(out), _as_numpy(src))


def test_no_parts_leaves_out_untouched():
    for dtype in SUPPORTED_DTYPES:
        out = torch.ones(3, dtype=torch.float32).to(dtype)
        before = _bits(out)
        reduce_into(out, [], Reduce.SUM)
        assert _bits(out) == before


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=str)
def test_empty_tensors(dtype):
    out = torch.empty(0, dtype=dtype)
    reduce_into(out, [torch.empty(0, dtype=dtype)] * 3, Reduce.AVG)
    assert out.numel() == 0


# ---------------------------------------------------------------- AVG semantics, by example


def _avg(dtype, *cols):
    parts = [torch.tensor(c, dtype=torch.int64).to(dtype) if not isinstance(c[0], float)
             else torch.tensor(c, dtype=dtype) for c in cols]
    out = torch.empty_like(parts[0])
    reduce_into(out, parts, Reduce.AVG)
    return out


@pytest.mark.parametrize("dtype", list(SIGNED), ids=str)
def test_avg_signed_truncates_toward_zero(dtype):
    out = _avg(dtype, [-7, 7, -1, 1, -3, 5], [0, 0, 0, 0, -2, 6])
    assert out.tolist() == [-3, 3, 0, 0, -2, 5]  # floor would give -4, -1 and -3


@pytest.mark.parametrize("dtype", list(UNSIGNED), ids=str)
def test_avg_unsigned_floors(dtype):
    out = _avg(dtype, [7, 1, 9, 100], [0, 0, 0, 27], [1, 0, 0, 0])
    assert _as_numpy(out).tolist() == [2, 0, 3, 42]


def test_avg_uint64_high_values_stay_exact():
    big = 2**63 - 1
    parts = [torch.from_numpy(np.array([big, 2**62 + 3], dtype=np.uint64)),
             torch.from_numpy(np.array([big - 2, 2**62], dtype=np.uint64))]
    out = torch.empty(2, dtype=torch.uint64)
    reduce_into(out, parts, Reduce.AVG)
    assert out.numpy().tolist() == [big - 1, 2**62 + 1]  # floor((2*big-2)/2), floor(.../2)


def test_avg_int64_is_exact_beyond_float_precision():
    a, b = 2**61 + 1, 2**61 + 4
    out = _avg(torch.int64, [a, -a], [b, -b], [0, 0])
    assert out.tolist() == [(a + b) // 3, -((a + b) // 3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64], ids=str)
def test_avg_float_divides(dtype):
    out = _avg(dtype, [1.0, -3.0, 2.0], [0.0, 0.0, 2.0])
    assert out.tolist() == [0.5, -1.5, 2.0]
    out = _avg(dtype, [1.0], [2.0], [4.0], [1.0])
    assert out.tolist() == [2.0]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_avg_float8_divides(dtype):
    vals = [[2.0, 4.0], [1.0, 8.0]] if dtype != torch.float8_e8m0fnu else [[2.0, 8.0], [2.0, 8.0]]
    parts = [torch.tensor(v).to(dtype) for v in vals]
    out = torch.empty(2, dtype=dtype)
    reduce_into(out, parts, Reduce.AVG)
    want = [1.5, 6.0] if dtype != torch.float8_e8m0fnu else [2.0, 8.0]
    assert out.float().tolist() == want


def test_avg_complex_divides():
    parts = [torch.tensor([1 + 1j, 4j]), torch.tensor([2 - 3j, 0j])]
    out = torch.empty(2, dtype=torch.complex64)
    reduce_into(out, [p.to(torch.complex64) for p in parts], Reduce.AVG)
    assert out.tolist() == [1.5 - 1j, 2j]


def test_avg_bool_is_or():
    cols = ([True, False, False, True], [False, False, True, True], [False, False, False, True])
    parts = [torch.tensor(c) for c in cols]
    out = torch.empty(4, dtype=torch.bool)
    reduce_into(out, parts, Reduce.AVG)
    assert out.tolist() == [True, False, True, True]


def test_bool_ops():
    a, b = torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])
    want = {Reduce.SUM: [1, 1, 1, 0], Reduce.MAX: [1, 1, 1, 0], Reduce.BOR: [1, 1, 1, 0],
            Reduce.PRODUCT: [1, 0, 0, 0], Reduce.MIN: [1, 0, 0, 0], Reduce.BAND: [1, 0, 0, 0],
            Reduce.BXOR: [0, 1, 1, 0], Reduce.AVG: [1, 1, 1, 0]}
    for op, w in want.items():
        out = torch.empty(4, dtype=torch.bool)
        reduce_into(out, [a, b], op)
        assert out.tolist() == [bool(x) for x in w], op


# ---------------------------------------------------------------- other fixed examples


def test_integer_sum_and_product_wrap_in_dtype():
    out = torch.empty(2, dtype=torch.int8)
    reduce_into(out, [torch.tensor([100, -100], dtype=torch.int8)] * 2, Reduce.SUM)
    assert out.tolist() == [-56, 56]
    out = torch.empty(1, dtype=torch.uint32)
    parts = [torch.from_numpy(np.array([2**31], dtype=np.uint32))] * 2
    reduce_into(out, parts, Reduce.PRODUCT)
    assert out.numpy().tolist() == [0]
    reduce_into(out, parts, Reduce.SUM)
    assert out.numpy().tolist() == [0]


@pytest.mark.parametrize("dtype", list(UNSIGNED), ids=str)
def test_unsigned_min_max_bitwise_use_unsigned_order(dtype):
    top = 2 ** UNSIGNED[dtype] - 1  # would be -1 if misread as signed
    mk = lambda v: torch.from_numpy(np.array(v, dtype=_NP_INT[dtype]))  # noqa: E731
    a, b = mk([top, 5, 12]), mk([1, top - 1, 10])
    expect = {Reduce.MIN: [1, 5, 10], Reduce.MAX: [top, top - 1, 12],
              Reduce.BAND: [1, 4, 8], Reduce.BOR: [top, top, 14],
              Reduce.BXOR: [top - 1, top - 4, 6]}
    for op, want in expect.items():
        out = torch.empty(3, dtype=dtype)
        reduce_into(out, [a, b], op)
        assert out.numpy().tolist() == want, op


def test_reduction_order_is_left_to_right():
    # float addition is not associative: the documented order must be the one used
    a, b, c = (torch.tensor([v], dtype=torch.float32) for v in (1e8, 1.0, -1e8))
    out = torch.empty(1, dtype=torch.float32)
    reduce_into(out, [a, b, c], Reduce.SUM)
    assert out.item() == 0.0  # (1e8 + 1) rounds back to 1e8
    reduce_into(out, [a, c, b], Reduce.SUM)
    assert out.item() == 1.0


def test_reduced_floats_round_every_step():
    # float16: 2048 + 1 rounds to 2048 each time, so adding 1 four times changes nothing
    parts = [torch.tensor([2048.0], dtype=torch.float16)] + [
        torch.tensor([1.0], dtype=torch.float16)] * 4
    out = torch.empty(1, dtype=torch.float16)
    reduce_into(out, parts, Reduce.SUM)
    assert out.item() == 2048.0


def test_float8_accumulates_wide_and_rounds_once():
    # e4m3fn: 16 + 1 == 16 in float8, but through float32 16+1+1 = 18 is representable
    dt = torch.float8_e4m3fn
    parts = [torch.tensor([16.0]).to(dt), torch.tensor([1.0]).to(dt), torch.tensor([1.0]).to(dt)]
    out = torch.empty(1, dtype=dt)
    reduce_into(out, parts, Reduce.SUM)
    assert out.float().item() == 18.0


@pytest.mark.parametrize("op", [Reduce.MIN, Reduce.MAX, Reduce.SUM], ids=lambda o: o.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64, torch.float8_e5m2], ids=str)
def test_nan_propagates(dtype, op):
    parts = [torch.tensor([1.0, math.nan]).to(dtype), torch.tensor([math.nan, 2.0]).to(dtype)]
    out = torch.empty(2, dtype=dtype)
    reduce_into(out, parts, op)
    assert torch.isnan(out.float()).tolist() == [True, True]
