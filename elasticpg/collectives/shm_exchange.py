"""Rounds of a collective over shared memory: post a window, wait for the peers' windows.

Every participant posts in every round (possibly an empty window), so each round is a full
exchange. That gives the buffer-reuse rule without acknowledgements: a rank alternates its two
buffers, and it overwrites a buffer only two posts later, after it has seen every peer's post of
the round in between, which each peer made only after it finished reading the older one.

Each post carries a descriptor (kind, dtype, count, root, reduce op, stream length, readiness
digest, participants, epoch) that readers compare like frame headers (mismatch ->
CollectiveMismatchError on every rank). The exclusion rule is the TCP one: a peer's window
counts iff its token was seen, i.e. it was written whole (the token is written after the data
and descriptor); a peer that is declared failed before that is recorded in ctx.failed and
skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from ..core.framing import Header, MsgType, OpKind
from ..core.slot_masks import KEY_EXACT_SLOTS, mask_bytes, mask_from_bytes, mask_key, ranks_of
from ..errors import CollectiveMismatchError, OperationTimeoutError
from ..group.shm_host import ShmHost
from ..transport.memcopy import copy_bytes
from ..transport.shm import INCLUDED, PARTS, RED, TOK, Region, wait_for
from .context import OpContext, OpSpec


class _PeerGoneError(Exception):
    pass


class _PeerLagError(Exception):
    """The peer runs this collective under a view that puts it on TCP (see runtime.shm_probe)."""


def byte_view(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def expect_words(spec: OpSpec) -> list[int]:
    """The descriptor words every participant's post must match: (kind, dtype, reduce op)
    packed in one word, the count, the root."""
    return [int(spec.kind) | spec.dtype << 8 | int(spec.redop) << 16, spec.numel, spec.root]


class ShmOp:
    """One collective's use of shared memory (see module docstring)."""

    def __init__(self, ctx: OpContext, host: ShmHost, regions: dict[int, Region]) -> None:
        """`regions`: the peers' mapped regions (ShmHost.regions_for); read, never changed."""
        self.ctx = ctx
        self.host = host
        self.me = host.mine
        self.window = host.window
        self.spin = host.spin_for(ctx.participants)
        self.regions = regions
        if len(regions) < len(ctx.peers):
            # a process that is gone: nothing of it can be read
            ctx.failed.update(p for p in ctx.peers if p not in regions)
        self.expect = expect_words(ctx.spec)
        self.parts_mask = sum(1 << p for p in ctx.participants)
        # A group wider than one word posts a key of its participants in the descriptor and
        # the full mask beside it (transport.shm layout): keys equal, the full masks decide.
        slots = host.slots
        self.wide = slots > KEY_EXACT_SLOTS
        self.parts_key = mask_key(self.parts_mask, slots)
        self.parts_raw = mask_bytes(self.parts_mask, slots) if self.wide else b""
        self.bufs: dict[int, int] = {}  # peer -> buffer of its post in the current round

    # ---- posting ----------------------------------------------------------------------------
    def token(self, k: int) -> int:
        return (self.ctx.seq << 20) | (k + 1)

    def post(self, k: int,
             segments: list[tuple[int, torch.Tensor]] | list[tuple[int, np.ndarray]] | np.ndarray,
             stream_len: int,
             table: list[int] | None = None,
             writer: Callable[[np.ndarray], None] | None = None) -> int:
        """Copy the part of our stream inside window k into the next buffer, then publish it.

        `writer` (only for a stream that fits in one window, k == 0): called with the buffer's
        first `stream_len` bytes to write the stream there itself, instead of `segments` being
        copied in (a sender that gathers its rows straight into the window saves a copy)."""
        host, me, ctx = self.host, self.me, self.ctx
        b = 1 - host.last_buffer
        host.last_buffer = b
        ctl = me.ctl
        ctl[TOK + 8 * b] = 0
        ctl[RED + 8 * b] = 0
        lo = k * self.window
        hi = lo + self.window
        if writer is not None:
            writer(me.raw_bytes(b, 0, stream_len))
        elif isinstance(segments, np.ndarray):  # one small numpy segment, for the fast path
            me.np_raw(b, segments.size)[:] = segments
        elif segments:  # (stream offset, byte tensor or numpy byte array) pieces
            raw = me.np_raw(b, self.window) if isinstance(segments[0][1], np.ndarray) \
                else me.raw(b)
            for off, seg in segments:
                a, c = max(off, lo), min(off + len(seg), hi)
                if a < c:
                    copy_bytes(raw[a - lo:c - lo], seg[a - off:c - off])
        d = TOK + 8 * b + 1
        ctl[d], ctl[d + 1], ctl[d + 2] = self.expect
        ctl[d + 3], ctl[d + 4], ctl[d + 5], ctl[d + 6] = (stream_len, ctx.ready,
                                                          self.parts_key, ctx.epoch)
        if self.wide:
            me.write_mask(b, PARTS, self.parts_raw)
        if table is not None:
            me.table(b)[:] = table
        ctl[TOK + 8 * b] = self.token(k)
        me.ring(ctx.me, self.regions.values())
        return b

    def post_reduced(self, b: int, k: int, mask: int) -> None:
        ctl = self.me.ctl
        if self.wide:
            self.me.write_mask(b, INCLUDED, mask_bytes(mask, self.me.slots))
        ctl[RED + 8 * b + 1] = mask_key(mask, self.me.slots)
        ctl[RED + 8 * b] = self.token(k)
        self.me.ring(self.ctx.me, self.regions.values())

    # ---- waiting ----------------------------------------------------------------------------
    def _check(self, peer: int, token: int, region: Region) -> None:
        mb = self.ctx.link.mailbox
        if mb._aborted:
            raise CollectiveMismatchError(next(iter(mb._aborted.values())))
        if peer in mb._failed:
            raise _PeerGoneError
        if self.ctx.link.excluded_after(peer, self.ctx.epoch):
            raise _PeerGoneError  # a newer decided view excludes it: it will not post this op
        if mb._closed is not None:
            raise OperationTimeoutError(f"group closed: {mb._closed}")
        if min(int(region.ctl[TOK]), int(region.ctl[TOK + 8])) > token:
            raise _PeerGoneError  # it moved past this round: it counted us out
        if mb.has_coll_from(peer, self.ctx.seq):
            raise _PeerLagError

    def _wait(self, peer: int, region: Region, cond, token: int, what: str) -> bool:
        try:
            self._check(peer, token, region)  # a peer already known gone: no spinning for it
            wait_for(region, cond, lambda: self._check(peer, token, region),
                     self.ctx.deadline, self.spin, self.me, peer)
        except _PeerGoneError:
            if cond():  # it posted before it went: what it wrote whole still counts
                return True
            self.ctx.failed.add(peer)
            return False
        except _PeerLagError:
            self.ctx.lagged.add(peer)
            self.ctx.failed.add(peer)
            return False
        except TimeoutError:
            if self.ctx.give_up_on_timeout:
                self.ctx.timed_out.add(peer)
                self.ctx.failed.add(peer)
                return False
            raise OperationTimeoutError(f"timed out waiting for rank {peer} in collective "
                                        f"#{self.ctx.seq} ({what})") from None
        return True

    def wait_post(self, peer: int, k: int, positional: bool = False) -> Region | None:
        """The peer's region once its window k is posted (descriptor checked), else None.

        `positional`: the post's stream holds blocks at the positions of the poster's
        participants (reduce_scatter, scatter), so a poster that runs over other participants
        cannot be read (see _other_view)."""
        region = self.regions.get(peer)
        if region is None or peer in self.ctx.failed:
            return None
        token = self.token(k)
        ctl = region.ctl
        if not (ctl[TOK] == token or ctl[TOK + 8] == token):
            if not self._wait(peer, region, lambda: ctl[TOK] == token or ctl[TOK + 8] == token,
                              token, f"window {k}"):
                return None
        b = 0 if ctl[TOK] == token else 1
        self.bufs[peer] = b
        d = TOK + 8 * b + 1
        ctx = self.ctx
        if (ctl[d + 5] != self.parts_key or ctl[d + 6] > ctx.epoch
                or self.wide and region.mask_raw(b, PARTS) != self.parts_raw) and \
                self._other_view(peer, ctl[d + 6], self._parts_of(region, b), positional):
            return None
        if ctl[d:d + 3].tolist() != self.expect:
            if ctx.lag(peer, ctl[d + 6]):
                return None
            self._mismatch(peer, b)
        if k == 0:
            ctx.heard_ready[peer] = ctl[d + 4]
        return region

    def _parts_of(self, region: Region, b: int) -> int:
        """The participants mask of the region's post in buffer b."""
        if self.wide:
            return mask_from_bytes(region.mask_raw(b, PARTS))
        return int(region.ctl[TOK + 8 * b + 6])

    def _other_view(self, peer: int, epoch: int, parts: int, positional: bool) -> bool:
        """The peer applied another view than ours: whether to skip its post.

        A newer view is learnt at once, as from a VIEW frame. A peer that runs this operation
        without us is skipped: its contribution is not ours to count. Otherwise its post is
        read unless `positional` and its participants differ from ours: then our blocks sit
        elsewhere in its stream, and it is skipped as view lag (local_success False, no
        exclusion). TCP frames are addressed per destination, so there only a size
        disagreement is lag."""
        ctx = self.ctx
        if epoch > ctx.epoch or not parts >> ctx.me & 1:
            ctx.link.note_decision(epoch, frozenset(ranks_of(parts)))
        if not parts >> ctx.me & 1:
            ctx.failed.add(peer)
            return True
        if not positional or parts == self.parts_mask:
            return False
        if not ctx.lag(peer, epoch):
            ctx._mismatch(f"rank {peer} runs collective #{ctx.seq} over ranks "
                          f"{ranks_of(parts)}, rank {ctx.me} over {list(ctx.participants)} "
                          f"in the same view")
        return True

    def same_participants(self, peer: int) -> bool:
        """Whether the peer's current post runs over our participants (then it slices and
        chooses algorithms as we do)."""
        region, b = self.regions[peer], self.bufs[peer]
        return region.ctl[TOK + 8 * b + 6] == self.parts_key and (
            not self.wide or region.mask_raw(b, PARTS) == self.parts_raw)

    def wait_reduced(self, peer: int, k: int) -> int | None:
        """The included-ranks mask of the peer's reduced slice of window k, or None."""
        region = self.regions[peer]
        token, b = self.token(k), self.bufs[peer]
        ctl, i = region.ctl, RED + 8 * b
        if ctl[i] != token and not self._wait(peer, region, lambda: ctl[i] == token, token,
                                              f"reduced slice of window {k}"):
            return None
        if self.wide:
            return mask_from_bytes(region.mask_raw(b, INCLUDED))
        return int(ctl[i + 1])

    def epoch_of(self, peer: int) -> int:
        """The view epoch of the peer's current post."""
        return self.regions[peer].ctl[TOK + 8 * self.bufs[peer] + 7]

    def stream_len(self, peer: int) -> int:
        return self.regions[peer].ctl[TOK + 8 * self.bufs[peer] + 4]

    def _mismatch(self, peer: int, b: int) -> None:
        d = TOK + 8 * b + 1
        word, numel, root, nbytes, ready, _parts, epoch = self.regions[peer].ctl[d:d + 7].tolist()
        kind, dtype, redop = word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF
        try:
            h = Header(MsgType.COLL, peer, nbytes, OpKind(kind), dtype, redop, epoch,
                       self.ctx.seq, 0, numel, root, ready=ready)
            problem = self.ctx._compare(h, self.ctx.spec.numel, None)
        except ValueError:
            problem = f"rank {peer} posted an unknown operation kind {kind}"
        self.ctx._mismatch(problem or f"rank {peer} posted a different call")

    def remaining(self) -> float:
        return self.ctx.deadline - time.monotonic()
