"""Byte copies of the shared-memory data plane, and when they use streaming stores.

A collective's large output is written once and not read again before the op returns, so
copying into it with streaming stores (the optional C helper `_streamcopy`) skips reading
every destination line first. Smaller outputs stay in the caches, where plain copies win, and
where the destination was just read (an in-place reduction) it is cached anyway.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

try:
    from ._streamcopy import STREAMING, stream
except ImportError:  # built without a C compiler: plain copies throughout
    STREAMING, stream = 0, None

MEMMOVE_FROM = 64 << 10  # bytes: from here on libc's memmove beats Tensor.copy_ by ~25%
STREAM_FROM = 4 << 20  # output bytes of one op from which its copies stream (past L2, most of L3)


def streams(output_bytes: int) -> bool:
    """Whether an op writing `output_bytes` in all should copy with streaming stores."""
    return bool(STREAMING) and output_bytes >= STREAM_FROM


def copy_bytes(dst: torch.Tensor | np.ndarray, src: torch.Tensor | np.ndarray,
               streaming: bool = False) -> None:
    """dst[:] = src for contiguous byte tensors or numpy byte arrays of equal length;
    `streaming` (see streams()) for an output nobody reads soon."""
    if streaming and stream is not None:
        stream(dst if isinstance(dst, np.ndarray) else dst.numpy(),
               src if isinstance(src, np.ndarray) else src.numpy())
    elif isinstance(dst, np.ndarray):
        dst[:] = src  # numpy copies contiguous bytes with memcpy itself
    elif (n := src.numel()) >= MEMMOVE_FROM:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), n)
    elif n:
        dst.copy_(src)
