"""The shared-memory plane's byte copies: the streaming-store C helper against numpy, at every
alignment of both ends, and its refusals of bad buffers."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticpg.transport import memcopy

needs_helper = pytest.mark.skipif(memcopy.stream is None, reason="C helper not built")


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="streaming stores are built for x86-64 only")
def test_helper_is_built_with_streaming_stores():
    # `pip install` builds it (optional, so a missing compiler only costs speed); on the
    # machines we test on a silent build failure must show here, not as a slower benchmark
    assert memcopy.stream is not None and memcopy.STREAMING == 1


@needs_helper
@settings(max_examples=300, deadline=None)
@given(dst_at=st.integers(0, 63), src_at=st.integers(0, 63),
       n=st.one_of(st.integers(0, 600), st.integers(600, 20_000)))
def test_stream_equals_a_plain_copy_at_any_alignment(dst_at, src_at, n):
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, src_at + n + 64, dtype=np.uint8)
    dst = np.full(dst_at + n + 64, 0xA5, dtype=np.uint8)
    want = dst.copy()
    want[dst_at:dst_at + n] = src[src_at:src_at + n]
    memcopy.stream(dst[dst_at:dst_at + n], src[src_at:src_at + n])
    assert np.array_equal(dst, want)  # the bytes around the destination are untouched too


@needs_helper
def test_stream_refuses_bad_buffers():
    a, b = np.zeros(100, np.uint8), np.zeros(101, np.uint8)
    with pytest.raises(ValueError, match="100 bytes, source 101"):
        memcopy.stream(a, b)
    ro = np.zeros(100, np.uint8)
    ro.flags.writeable = False
    with pytest.raises((ValueError, BufferError, TypeError)):
        memcopy.stream(ro, a)
    with pytest.raises((ValueError, BufferError, TypeError)):
        memcopy.stream(np.zeros(200, np.uint8)[::2], a)  # not contiguous
    with pytest.raises(TypeError):
        memcopy.stream(a)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        memcopy.stream(a, 5)  # type: ignore[arg-type]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("n", [0, 5, 70_000])  # Tensor.copy_, memmove, either side of 64 KiB
def test_copy_bytes_tensors_and_arrays(streaming, n):
    src = torch.randint(0, 256, (n + 3,), dtype=torch.uint8)[3:]
    for dst in (torch.zeros(n, dtype=torch.uint8), np.zeros(n, np.uint8)):
        memcopy.copy_bytes(dst, src if isinstance(dst, torch.Tensor) else src.numpy(), streaming)
        assert np.array_equal(np.asarray(dst), src.numpy())


def test_streams_only_large_outputs():
    assert not memcopy.streams(memcopy.STREAM_FROM - 1)
    assert memcopy.streams(memcopy.STREAM_FROM) == bool(memcopy.STREAMING)
