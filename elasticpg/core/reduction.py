"""Reductions over contributions, in a fixed order so that every rank computes bit-identical
results (float addition is not associative: ((a+b)+c) and (a+(b+c)) may differ).

Torch lacks CPU kernels for some dtypes (uint16/32/64 arithmetic, float8): those reduce through
numpy (unsigned) or float32 (float8, rounded back once at the end).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .dtypes import is_integral


class Reduce(enum.IntEnum):
    SUM = 0
    AVG = 1
    PRODUCT = 2
    MIN = 3
    MAX = 4
    BAND = 5
    BOR = 6
    BXOR = 7


_FROM_TORCH = {
    dist.ReduceOp.SUM: Reduce.SUM,
    dist.ReduceOp.AVG: Reduce.AVG,
    dist.ReduceOp.PRODUCT: Reduce.PRODUCT,
    dist.ReduceOp.MIN: Reduce.MIN,
    dist.ReduceOp.MAX: Reduce.MAX,
    dist.ReduceOp.BAND: Reduce.BAND,
    dist.ReduceOp.BOR: Reduce.BOR,
    dist.ReduceOp.BXOR: Reduce.BXOR,
}

_UNSIGNED_WIDE = {torch.uint16, torch.uint32, torch.uint64}
_UPCAST = {getattr(torch, n) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "complex32") if hasattr(torch, n)}
WIDENED = frozenset(_UPCAST)  # dtypes reduced in a wider type, then rounded back


def from_torch(op: object) -> Reduce:
    """Map a torch ReduceOp (or RedOpType) to ours; PREMUL_SUM and unknown ops are rejected."""
    key = getattr(op, "op", op)  # ReduceOp instances wrap a RedOpType in .op
    try:
        return _FROM_TORCH[key]  # the common case: one lookup (this runs on every collective)
    except (KeyError, TypeError):
        pass
    for torch_op, ours in _FROM_TORCH.items():
        if key == torch_op or key == getattr(torch_op, "op", torch_op):
            return ours
    raise ValueError(f"elasticpg does not support reduce op {op}")


def check_supported(op: Reduce, dtype: torch.dtype) -> None:
    """Raise a clear error for a reduce op that makes no sense for a dtype."""
    if op in (Reduce.BAND, Reduce.BOR, Reduce.BXOR) and not is_integral(dtype):
        raise ValueError(f"bitwise reduce op {op.name} needs an integer or bool dtype, got {dtype}")
    if op in (Reduce.MIN, Reduce.MAX) and dtype.is_complex:
        raise ValueError(f"reduce op {op.name} is undefined for complex dtype {dtype}")


def _combine(op: Reduce, acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc = acc (op) x, in place. acc and x have the same dtype and shape."""
    dtype = acc.dtype
    if dtype == torch.bool:
        if op in (Reduce.SUM, Reduce.MAX, Reduce.BOR, Reduce.AVG):
            acc.logical_or_(x)
        elif op in (Reduce.PRODUCT, Reduce.MIN, Reduce.BAND):
            acc.logical_and_(x)
        else:
            acc.logical_xor_(x)
        return
    if op in (Reduce.SUM, Reduce.AVG):
        acc.add_(x)
    elif op == Reduce.PRODUCT:
        acc.mul_(x)
    elif op == Reduce.MIN:
        torch.minimum(acc, x, out=acc)
    elif op == Reduce.MAX:
        torch.maximum(acc, x, out=acc)
    elif op == Reduce.BAND:
        acc.bitwise_and_(x)
    elif op == Reduce.BOR:
        acc.bitwise_or_(x)
    else:
        acc.bitwise_xor_(x)


def _combine_numpy(op: Reduce, acc: torch.Tensor, x: torch.Tensor) -> None:
    import numpy as np

    a, b = acc.numpy(), x.numpy()
    fn = {Reduce.SUM: np.add, Reduce.AVG: np.add, Reduce.PRODUCT: np.multiply,
          Reduce.MIN: np.minimum, Reduce.MAX: np.maximum, Reduce.BAND: np.bitwise_and,
          Reduce.BOR: np.bitwise_or, Reduce.BXOR: np.bitwise_xor}[op]
    fn(a, b, out=a)


def reduce_into(out: torch.Tensor, parts: Sequence[torch.Tensor], op: Reduce) -> None:
    """out = parts[0] (op) parts[1] (op) ... in this order; AVG divides by len(parts).

    `out` may alias parts[0] (then it is reduced in place) but no other part. All tensors are
    contiguous with out's dtype and numel. With no parts `out` is left untouched.
    """
    if not parts:
        return
    dtype = out.dtype
    flat_out = out.reshape(-1)
    if dtype in _UPCAST:
        wide = torch.float32 if not dtype.is_complex else torch.complex64
        acc = parts[0].reshape(-1).to(wide)
        for p in parts[1:]:
            _combine(op, acc, p.reshape(-1).to(wide))
        if op == Reduce.AVG:
            acc.div_(len(parts))
        flat_out.copy_(acc)
        return
    combine = _combine_numpy if dtype in _UNSIGNED_WIDE else _combine
    first = parts[0].reshape(-1)
    if first.data_ptr() != flat_out.data_ptr():
        flat_out.copy_(first)
    for p in parts[1:]:
        combine(op, flat_out, p.reshape(-1))
    if op == Reduce.AVG and len(parts) > 1:
        if dtype == torch.bool:
            return  # AVG of bools is their OR, like SUM
        if is_integral(dtype):
            if dtype in _UNSIGNED_WIDE:
                a = flat_out.numpy()
                a //= len(parts)
            else:
                flat_out.copy_(torch.div(flat_out, len(parts), rounding_mode="trunc"))
        else:
            flat_out.div_(len(parts))
