"""Routing and layout of expert-parallel dispatch/combine, as pure functions over tensors.

No I/O, no group: the shell (`buffer.py`) asks these functions what to send where, moves the
bytes, and asks them how to lay out what arrived. Everything that can be wrong about a call is
decided here, in-process, table-driven and testable without a single process spawned.

Vocabulary (the DeepEP low-latency model): R ranks, E experts, L = E // R local experts per
rank, expert e lives on rank e // L; N = the most tokens any rank dispatches in one step.

A *row* is one (token, expert) pair: a token that selects an expert twice is sent to it once
(the expert computes it once) and combine applies the sum of both weights, which is what the
dense reference computes. Rows leave a source sorted by (expert, token), so each destination's
rows are contiguous, grouped by local expert, in token order: the receiver can place them with
one copy per (source, local expert) and the layout is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

try:  # combine's one-pass folds and dispatch's fp8 quantisation (optional C helper; torch ops
    # compute the same, bit for bit, without it)
    from ._fold import copy_rows as _c_copy_rows
    from ._fold import fold as _c_fold
    from ._fold import fold_tokens as _c_fold_tokens
    from ._fold import plan as _c_plan
    from ._fold import quantize_fp8 as _c_quantize_fp8
except ImportError:
    _c_fold = _c_fold_tokens = _c_quantize_fp8 = _c_copy_rows = _c_plan = None

FP8_BLOCK = 128  # channels per fp8 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_AMAX = 1e-4  # scale floor, so an all-zero block does not divide by zero
HEADER_WORDS = 8  # int64 words of the per-destination header (see header_words)
EP_VERSION = 1
X_DTYPES = (torch.bfloat16, torch.float32)


class EPConfigError(ValueError):
    """A dispatch/combine argument is wrong at the caller (shape, dtype, range, size)."""


class EPMismatchError(EPConfigError):
    """Ranks called dispatch/combine with different N, hidden, num_experts or dtype."""


# ---- sizes --------------------------------------------------------------------------------------
def row_bytes(hidden: int, fp8: bool, itemsize: int) -> int:
    """Bytes one dispatched row occupies on the wire: data, fp8 scales, its token index."""
    return (hidden + hidden // FP8_BLOCK * 4 if fp8 else hidden * itemsize) + 4


def dispatch_blob_bytes(local: int, rows: int, hidden: int, fp8: bool, itemsize: int) -> int:
    """Bytes of one dispatch blob past its header: counts (int32 [L]), token indices (int32
    [rows]) padded to 8 bytes, the rows' data, (fp8) their scales, padded to 8 bytes: the data
    then starts 8-aligned, so both sides can move rows as int64 words (see wide_rows)."""
    return pad8(data_offset(local, rows) + rows * (row_bytes(hidden, fp8, itemsize) - 4))


def data_offset(local: int, rows: int) -> int:
    """Where a dispatch blob's row data starts, past its header."""
    return pad8(4 * (local + rows))


def pad8(n: int) -> int:
    return -(-n // 8) * 8


def wide_rows(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Views of the 2-D tensors `ts` (same row bytes, rows contiguous) with the widest integer
    element that divides the row and every tensor's start: row copies (index_select,
    index_copy_) then move 8-byte words instead of 2-byte ones, measured ~1.5x faster, the
    very same bytes. All views share one element type, so they can be copied into each other."""
    esize = ts[0].element_size()
    nbytes = ts[0].shape[1] * esize
    for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if size > esize and not nbytes % size and \
                all(not t.storage_offset() * esize % size for t in ts):
            return tuple(t.view(dt) for t in ts)
    return ts


def copy_rows(dst: torch.Tensor, dst_rows: np.ndarray, src: torch.Tensor,
              src_rows: np.ndarray) -> None:
    """dst[dst_rows[i]] = src[src_rows[i]] for 2-D tensors with rows of the same bytes (int64
    numpy indices): one C call (a memcpy per row), or without the helper an index_select and
    an index_copy_ of wide_rows views; the same bytes either way."""
    if _c_copy_rows is not None and dst.is_contiguous() and src.is_contiguous():
        _c_copy_rows(dst.view(torch.uint8).numpy(), dst_rows, src.view(torch.uint8).numpy(),
                     src_rows, dst.shape[1] * dst.element_size())
        return
    wide, into = wide_rows(src, dst)
    into.index_copy_(0, torch.from_numpy(dst_rows),
                     wide.index_select(0, torch.from_numpy(src_rows)))


def block_rows(blocks: list[tuple[int, int, int]]) -> np.ndarray:
    """int64 [rows]: the recv_x rows (of recv_x.view(L * stride, ...)) that `blocks` (see
    blocks()) cover, in the source's order."""
    if len(blocks) == 1:
        at, _o, m = blocks[0]
        return np.arange(at, at + m, dtype=np.int64)
    return np.concatenate([np.arange(at, at + m, dtype=np.int64) for at, _o, m in blocks])


def size_hint(n: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of exchange buffer one rank needs for the largest step: every one of its N tokens
    may go to every local expert of every rank (dispatch, in float32), and come back (combine),
    plus the received side of both. Deterministic and conservative, as the reference's hint."""
    check_shape(n, hidden, num_ranks, num_experts)
    local = num_experts // num_ranks
    rows = n * num_ranks * local  # rows a rank may send (and receive), at most
    return 2 * rows * (row_bytes(hidden, False, 4) + hidden * 4) + \
        num_ranks * HEADER_WORDS * 8 * 2


# ---- validation ---------------------------------------------------------------------------------
def check_shape(n: int, hidden: int, num_ranks: int, num_experts: int) -> None:
    for name, v in (("num_max_dispatch_tokens_per_rank", n), ("hidden", hidden),
                    ("num_ranks", num_ranks), ("num_experts", num_experts)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise EPConfigError(f"{name} must be a positive int, got {v!r}")
    if num_experts % num_ranks:
        raise EPConfigError(f"num_experts ({num_experts}) must be divisible by the number of "
                            f"ranks ({num_ranks})")


def check_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, n: int, num_experts: int,
                   num_ranks: int, use_fp8: bool) -> None:
    """Raise EPConfigError for anything dispatch cannot run on, before any byte moves."""
    check_shape(n, x.shape[1] if x.dim() == 2 else 1, num_ranks, num_experts)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise EPConfigError(f"x must be a 2-D tensor [tokens, hidden], got shape "
                            f"{tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in X_DTYPES:
        raise EPConfigError(f"x must be bfloat16 or float32, got {x.dtype}")
    t, hidden = x.shape
    if use_fp8 and hidden % FP8_BLOCK:
        raise EPConfigError(f"use_fp8 needs hidden divisible by {FP8_BLOCK}, got {hidden}")
    check_topk(topk_idx, t, num_experts)
    if t > n:
        raise EPConfigError(f"x has {t} tokens, more than num_max_dispatch_tokens_per_rank "
                            f"({n})")


def check_topk(topk_idx: torch.Tensor, t: int, num_experts: int) -> None:
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 \
            or topk_idx.dim() != 2:
        raise EPConfigError(f"topk_idx must be a 2-D int64 tensor [tokens, k], got "
                            f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} of shape "
                            f"{tuple(getattr(topk_idx, 'shape', ()))}")
    if topk_idx.shape[0] != t:
        raise EPConfigError(f"topk_idx has {topk_idx.shape[0]} rows, x has {t} tokens")
    if topk_idx.numel():
        a = topk_idx.numpy() if topk_idx.device.type == "cpu" else topk_idx.cpu().numpy()
        lo, hi = int(a.min()), int(a.max())  # numpy: ~half the fixed cost of torch's
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise EPConfigError(f"topk_idx holds expert {bad}, outside -1..{num_experts - 1}")


def check_active(active_ranks: torch.Tensor, num_ranks: int) -> None:
    if not isinstance(active_ranks, torch.Tensor) or active_ranks.dtype != torch.int32 \
            or active_ranks.shape != (num_ranks,):
        raise EPConfigError(f"active_ranks must be an int32 tensor of shape ({num_ranks},), "
                            f"got {getattr(active_ranks, 'dtype', type(active_ranks).__name__)} "
                            f"{tuple(getattr(active_ranks, 'shape', ()))}")


def check_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  local: int, num_ranks: int, n: int, hidden: int, num_experts: int,
                  tokens: int) -> None:
    want = (local, num_ranks * n, hidden)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
        raise EPConfigError(f"combine x must have shape {want} (local experts, R*N, hidden), "
                            f"got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in X_DTYPES:
        raise EPConfigError(f"combine x must be bfloat16 or float32, got {x.dtype}")
    check_topk(topk_idx, tokens, num_experts)
    if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point() \
            or tuple(topk_weights.shape) != tuple(topk_idx.shape):
        raise EPConfigError(f"topk_weights must be a float tensor of topk_idx's shape "
                            f"{tuple(topk_idx.shape)}, got "
                            f"{getattr(topk_weights, 'dtype', None)} "
                            f"{tuple(getattr(topk_weights, 'shape', ()))}")


# ---- dispatch: what a source sends --------------------------------------------------------------
@dataclass
class SendPlan:
    """Where each of a source's rows goes, and how combine folds the answers back."""

    row_token: torch.Tensor  # int64 [rows]: the token of each row, rows sorted (expert, token)
    row_expert: torch.Tensor  # int64 [rows]
    counts: list[list[int]]  # [R][L]: rows for each local expert of each destination
    rank_rows: list[int]  # [R]: rows per destination (contiguous, in destination order)
    sel_row: torch.Tensor  # int64 [T, k]: each selection's row, -1 if not sent

    _token_rows: torch.Tensor | None = field(default=None, repr=False)
    _row_offsets: list[int] | None = field(default=None, repr=False)

    @property
    def token_rows(self) -> torch.Tensor:
        """int64 [T, k]: each token's rows, ascending, -1 for an unsent selection and for the
        repeat of a row (a token that picked one expert twice has one row): the order in
        which a token-major fold adds them, which is the rows' order."""
        if self._token_rows is None:  # in numpy: small [T, k] ops (see plan_dispatch)
            rows = np.sort(self.sel_row.numpy(), axis=1)
            if rows.shape[1] > 1:
                tail = rows[:, 1:]
                tail[tail == rows[:, :-1]] = -1
            self._token_rows = torch.from_numpy(np.ascontiguousarray(rows))
        return self._token_rows

    @property
    def row_offsets(self) -> list[int]:
        """[R]: each destination's first row (computed once: read several times per call)."""
        if self._row_offsets is None:
            out, acc = [], 0
            for c in self.rank_rows:
                out.append(acc)
                acc += c
            self._row_offsets = out
        return self._row_offsets


def plan_dispatch(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                  usable: list[bool]) -> SendPlan:
    """The rows a source sends: one per distinct (token, expert) pair whose expert lives on a
    `usable` rank, sorted by (expert, token).

    In numpy: small ops on [T, k], where torch's fixed cost per op dominates (measured
    46 -> 24 us per call at 32 tokens x top-4, 62 -> 42 us at 128 x top-8)."""
    t, k = topk_idx.shape
    local = num_experts // num_ranks
    idx = topk_idx.numpy()
    if _c_plan is not None and idx.flags.c_contiguous:
        # one counting-sort pass in C (the same arrays; measured ~40 -> ~5 us at 32 x top-4)
        return _plan_c(idx, num_experts, num_ranks, usable)
    valid = idx >= 0
    if not all(usable):
        valid &= np.asarray(usable, dtype=bool)[np.maximum(idx, 0) // local]
    # unsent selections get a key above every real one (sorted last, then dropped)
    tt = max(t, 1)
    keys = np.where(valid, idx * tt + np.arange(t, dtype=np.int64)[:, None],
                    num_experts * tt).reshape(-1)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.empty(ordered.size, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    ukeys = ordered[first]
    inverse = np.empty(ordered.size, dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    if ukeys.size and ukeys[-1] == num_experts * tt:
        ukeys = ukeys[:-1]
    row_expert = ukeys // tt
    row_token = ukeys - row_expert * tt
    counts = np.bincount(row_expert, minlength=num_experts).reshape(num_ranks, local).tolist()
    sel_row = np.where(valid, inverse.reshape(t, k), -1)
    return SendPlan(torch.from_numpy(row_token), torch.from_numpy(row_expert), counts,
                    [sum(c) for c in counts], torch.from_numpy(sel_row))


def _plan_c(idx: np.ndarray, num_experts: int, num_ranks: int, usable: list[bool]) -> SendPlan:
    """plan_dispatch by the C helper's counting sort: what the numpy code below computes."""
    t, k = idx.shape
    local = num_experts // num_ranks
    rows_at = np.empty((2, t * k), dtype=np.int64)  # row_token, row_expert (first `rows`)
    sel_row = np.empty((t, k), dtype=np.int64)
    counts = np.empty(num_experts, dtype=np.int64)
    token_rows = np.empty((t, k), dtype=np.int64)
    rows = _c_plan(idx, np.asarray(usable, dtype=np.uint8), rows_at[0], rows_at[1], sel_row,
                   counts, token_rows, t, k, num_experts, local)
    per = counts.reshape(num_ranks, local)
    return SendPlan(torch.from_numpy(rows_at[0, :rows]), torch.from_numpy(rows_at[1, :rows]),
                    per.tolist(), per.sum(axis=1).tolist(), torch.from_numpy(sel_row),
                    torch.from_numpy(token_rows))


def quantize_fp8(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-128-channel float8_e4m3fn: (data [T, hidden], scales float32 [T, hidden/128])
    with x ~= data * scale and scale = max(amax, 1e-4) / 448.

    `out` (data, scales) and `work` (float32, at least x's size) are reused buffers: a serving
    loop that quantises into them allocates nothing, and fresh megabyte tensors cost page
    faults on every call (measured 1.1 ms against 0.3 ms at 128 x 2048). The values are the
    same either way (amax as the larger of max and -min: the same number as abs().amax())."""
    t, hidden = x.shape
    nb = hidden // FP8_BLOCK
    if out is not None and _c_quantize_fp8 is not None and x.is_contiguous() and \
            x.dtype in X_DTYPES and out[0].is_contiguous() and out[1].is_contiguous():
        # one pass in C instead of ~11 torch ops (measured ~60 -> ~8 us at 32 x 256); a
        # non-finite x is left to the torch ops below, whose NaN rules are the reference
        raw = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
        if _c_quantize_fp8(raw.numpy(), out[0].view(torch.uint8).numpy(), out[1].numpy(),
                           hidden, x.element_size()):
            return out
    if work is None:
        blocks = x.view(t, nb, FP8_BLOCK).to(torch.float32, copy=True)  # scaled in place
    else:
        blocks = work.view(-1)[:t * hidden].view(t, nb, FP8_BLOCK)
        blocks.copy_(x.view(t, nb, FP8_BLOCK))
    amax = torch.maximum(blocks.amax(dim=2), blocks.amin(dim=2).neg_()).clamp_(min=FP8_MIN_AMAX)
    blocks.mul_((FP8_MAX / amax).unsqueeze(2))
    if out is None:
        data = blocks.to(torch.float8_e4m3fn).view(t, hidden)
        return data, amax.div_(FP8_MAX)
    data, scales = out
    data.view(t, nb, FP8_BLOCK).copy_(blocks)
    torch.div(amax, FP8_MAX, out=scales)
    return data, scales


def dequantize_fp8(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of fp8 `data` [..., hidden] with `scales` [..., hidden/128]."""
    shape = data.shape
    blocks = data.float().reshape(*shape[:-1], shape[-1] // FP8_BLOCK, FP8_BLOCK)
    return (blocks * scales.unsqueeze(-1)).reshape(shape)


# ---- the per-destination header -----------------------------------------------------------------
DTYPE_CODES = {torch.bfloat16: 1, torch.float32: 2}
FP8_CODE = 3


def header_words(kind: int, n: int, hidden: int, num_experts: int, code: int, tokens: int,
                 nbytes: int) -> list[int]:
    """What one rank tells each other rank before an exchange: the call's shape (checked for
    agreement) and how many bytes follow for that destination."""
    return [EP_VERSION | kind << 8, n, hidden, num_experts, code, tokens, nbytes, 0]


NBYTES_WORD = 6  # header word: bytes that follow for this destination
# the header's first words, which must be equal on every rank (header_mismatch)
AGREED_NAMES = ("call", "num_max_dispatch_tokens_per_rank", "hidden", "num_experts", "dtype")
AGREED_WORDS = len(AGREED_NAMES)
REJECTED = 0xFF  # the call kind in the header of a rank whose own arguments were bad
CALL_NAMES = {1: "dispatch", 2: "combine", REJECTED: "a call it rejected"}


def rejected_header() -> list[int]:
    """The header a rank sends when its own arguments were bad: the others then raise too,
    instead of waiting for data that is not coming."""
    return [EP_VERSION | REJECTED << 8] + [0] * (HEADER_WORDS - 1)


def header_mismatch(mine: list[int], theirs: list[int], peer: int, me: int) -> str:
    """Why a peer's header disagrees with ours ("" if it agrees)."""
    if theirs[0] >> 8 == REJECTED:
        return f"rank {peer} rejected its own arguments (its error says why)"
    names = AGREED_NAMES
    dtypes = {v: str(k).removeprefix("torch.") for k, v in DTYPE_CODES.items()} | \
        {FP8_CODE: "fp8"}
    for i, name in enumerate(names):
        if mine[i] != theirs[i]:
            a, b = theirs[i], mine[i]
            if i == 0:
                a, b = CALL_NAMES.get(a >> 8, a >> 8), CALL_NAMES.get(b >> 8, b >> 8)
            elif i == 4:
                a, b = dtypes.get(a, a), dtypes.get(b, b)
            return f"rank {peer} used {name} {a}, rank {me} used {b}"
    return ""


# ---- dispatch: how a destination lays out what arrived ------------------------------------------
@dataclass
class RecvLayout:
    """Where the rows from each source land in recv_x (grouped by source rank, then token)."""

    begin: list[list[int]]  # [R][L]: first row of source s's rows for local expert l
    counts: list[list[int]]  # [R][L]: 0 for sources that sent nothing or did not answer
    recv_count: list[int]  # [L]
    _rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def layout_range(self) -> torch.Tensor:
        """int64 [L, R]: (begin << 32) | count, as the reference packs it."""
        # in numpy ([R, L], then the same transposed view torch's version returned): two
        # torch.tensor()s of nested lists and two ops cost ~4x as much at these sizes
        b = np.array(self.begin, dtype=np.int64)
        b <<= 32
        b |= np.array(self.counts, dtype=np.int64)
        return torch.from_numpy(b).T

    def flat_rows(self, src: int, stride: int) -> torch.Tensor:
        """int64 indices into recv_x.view(L * stride, ...) of the rows from `src`, in the order
        the source sent them (local expert, then token). Kept: combine sends back the same
        rows that dispatch placed."""
        rows = self._rows.get((src, stride))
        if rows is None:
            rows = self._rows[src, stride] = self._flat_rows(src, stride)
        return rows

    def _flat_rows(self, src: int, stride: int) -> torch.Tensor:
        counts = torch.tensor(self.counts[src], dtype=torch.int64)
        n = int(counts.sum())
        if not n:
            return torch.empty(0, dtype=torch.int64)
        # row i of local expert e goes to e * stride + begin[e] + (i - first row of e)
        first = torch.arange(len(self.counts[src]), dtype=torch.int64) * stride + \
            torch.tensor(self.begin[src], dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        return torch.arange(n, dtype=torch.int64) + \
            torch.repeat_interleave(first - starts, counts, output_size=n)


def recv_layout(counts: list[list[int] | None], local: int) -> RecvLayout:
    """Rows per (source, local expert) -> their place; a None entry is a source that sent
    nothing (inactive, gone, or timed out)."""
    begin = [[0] * local for _ in counts]
    got = [c if c is not None else [0] * local for c in counts]
    total = [0] * local
    for s, row in enumerate(got):
        for e, c in enumerate(row):
            begin[s][e] = total[e]
            total[e] += c
    return RecvLayout(begin, got, total)


def blocks(counts: list[int], begin: list[int], stride: int) -> list[tuple[int, int, int]]:
    """One source's rows as contiguous blocks: (row in recv_x.view(L * stride, ...), row in
    the source's order (local expert, then token), rows) per local expert it sent rows to.
    Dispatch places each block with one copy, and combine sends each back with one."""
    out, at = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e * stride + begin[e], at, c))
            at += c
    return out


def check_counts(counts: list[int], local: int, n: int) -> bool:
    """Whether a source's per-expert row counts can be true: L of them, each 0..N (a source
    has at most N tokens, and sends each expert a token at most once)."""
    return len(counts) == local and all(0 <= c <= n for c in counts)


def layout_from_range(layout_range: torch.Tensor) -> RecvLayout:
    """The RecvLayout a dispatch handle's layout_range encodes (combine reads it back)."""
    lr = layout_range.to(torch.int64)
    begin = (lr >> 32).T.tolist()
    counts = (lr & 0xFFFFFFFF).T.tolist()
    return RecvLayout(begin, counts, [sum(c[e] for c in counts) for e in range(lr.shape[0])])


# ---- combine: folding the answers ---------------------------------------------------------------
def row_weights(plan: SendPlan, topk_weights: torch.Tensor, rows: int) -> torch.Tensor:
    """float32 [rows]: the summed weight of every selection that maps to each row (a token that
    picked an expert twice gets both weights on its one row)."""
    w = np.zeros(rows + 1, dtype=np.float32)  # + a row that unsent selections go to
    if rows:
        # np.add.at adds in index order, one float32 addition each, as index_add_ does (the
        # same sums bit for bit); in numpy: ~4 torch ops' fixed cost saved on [T, k]
        sel = plan.sel_row.numpy()
        np.add.at(w, np.where(sel >= 0, sel, rows).reshape(-1),
                  topk_weights.detach().to(torch.float32).reshape(-1).numpy())
    return torch.from_numpy(w[:rows])


FOLD_CHUNK_BYTES = 512 << 10  # float32 rows folded at a time: they stay in L2 across the
# convert, scale and add passes (measured ~12% faster than whole answers at 1024x2048)


def fold(combined: torch.Tensor, plan: SendPlan,
         answers: dict[int, torch.Tensor | list[torch.Tensor]],
         weights: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """combined [T, hidden] float32 += sum over the rows of each answering destination d of
    weight * answer: `answers[d]` [rank_rows[d], hidden] (or a list of consecutive blocks of
    those rows) holds d's answers in the order the rows were sent. Only destinations that
    answered whole (and are active) are in `answers`, so no unwritten or partial row ever
    reaches the output. Rows are folded in order, so the float additions are the same as one
    index_add_ per destination, whether by the C helper (one pass per row) or, without it, by
    torch ops in chunks of `scratch` (float32 [rows, hidden], reused across calls;
    fold_chunk_rows(hidden) rows is enough): bit-identical results either way."""
    offs = plan.row_offsets
    hidden = combined.shape[1]
    if _c_fold_tokens is not None and _fold_by_token(combined, plan, answers, weights):
        return
    if _c_fold is None and scratch is None:
        scratch = torch.empty(fold_chunk_rows(hidden), hidden, dtype=torch.float32)
    for d, ans in answers.items():
        a = offs[d]
        for part in ans if isinstance(ans, list) else [ans]:
            c = part.shape[0]
            if c:
                fold_rows(combined, part, plan.row_token[a:a + c], weights[a:a + c], scratch)
            a += c


def _fold_by_token(combined: torch.Tensor, plan: SendPlan,
                   answers: dict[int, torch.Tensor | list[torch.Tensor]],
                   weights: torch.Tensor) -> bool:
    """The C helper's token-major fold (each output row stays in L1 while its rows are added;
    the same additions in the same order as the row-major one), if every answer is a
    contiguous block of one supported dtype; False (nothing done) otherwise."""
    parts = [(a, p) for d, ans in answers.items()
             for a, p in _blocks_at(plan.row_offsets[d], ans)]
    if not parts:
        return True
    dtype = parts[0][1].dtype
    if dtype not in X_DTYPES or not all(p.dtype == dtype and p.is_contiguous()
                                        for _a, p in parts):
        return False
    hidden = combined.shape[1]
    addr = np.zeros(weights.shape[0], dtype=np.int64)
    step = np.arange(max(p.shape[0] for _a, p in parts), dtype=np.int64) * \
        (hidden * parts[0][1].element_size())
    for a, p in parts:
        c = p.shape[0]
        addr[a:a + c] = step[:c] + p.data_ptr()
    _c_fold_tokens(combined.numpy(), plan.token_rows.numpy(), addr,
                   weights.contiguous().numpy(), hidden, parts[0][1].element_size())
    return True


def _blocks_at(a: int, ans: torch.Tensor | list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    out = []
    for part in ans if isinstance(ans, list) else [ans]:
        if part.shape[0]:
            out.append((a, part))
        a += part.shape[0]
    return out


def fold_rows(combined: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
              weights: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """combined[tokens[i]] += weights[i] * rows[i] in float32, for i in order."""
    if _c_fold is not None and rows.dtype in X_DTYPES and rows.is_contiguous():
        raw = rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows
        _c_fold(combined.numpy(), raw.numpy(), tokens.numpy(), weights.numpy(),
                combined.shape[1], rows.element_size())
        return
    step = max(1, scratch.shape[0])
    for i in range(0, rows.shape[0], step):
        j = min(i + step, rows.shape[0])
        # convert, then scale in place: measured 3x faster than one promoting multiply
        part = scratch[:j - i].copy_(rows[i:j]).mul_(weights[i:j].unsqueeze(1))
        combined.index_add_(0, tokens[i:j], part)


def fold_chunk_rows(hidden: int) -> int:
    return max(1, FOLD_CHUNK_BYTES // (4 * max(hidden, 1)))


def dense_reference(xs: list[torch.Tensor], topks: list[torch.Tensor],
                    weights: list[torch.Tensor], num_experts: int, num_ranks: int,
                    expert_fn, dead: frozenset[int] = frozenset()) -> list[torch.Tensor]:
    """The single-process answer every rank's combine must give: for each rank's tokens,
    sum_k w * expert_fn(x, e) over selections whose expert is not on a `dead` rank, in
    float32. (Used by the tests and the benchmark's self-check.)"""
    local = num_experts // num_ranks
    out = []
    for x, idx, w in zip(xs, topks, weights, strict=True):
        acc = torch.zeros(x.shape, dtype=torch.float32)
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                if e < 0 or e // local in dead:
                    continue
                acc[t] += float(w[t, j]) * expert_fn(x[t].float(), e)
        out.append(acc)
    return out
