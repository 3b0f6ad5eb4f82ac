"""The gloo baseline of `elasticpg ep-bench`: MoE dispatch/combine with elasticpg.ep.Buffer's
semantics, written the straightforward way with torch ops and gloo's all_to_all_single.

This is what a competent torch user writes without a custom transport: one row per distinct
(token, expert) pair, sorted by expert then token (so each destination's rows are
contiguous), an all_to_all_single of the per-destination row counts, then one of the rows
(each prefixed with its local expert and token index) with those split sizes; the receiver
lays the rows out per local expert, grouped by source rank, then token, as Buffer does. Rows
move with index_select / index_copy_ (torch's fast row gather and scatter; advanced indexing
such as x[rows] was measured ~10x slower on uint8 rows and is not used).
Combine sends each row's expert output back the same way (the counts are known from the
dispatch) and the source sums weight * answer per token in float32 with index_add_. The same
fp8 quantisation (elasticpg.ep.layout.quantize_fp8) and the same order of float additions as
Buffer, so the results are identical (the benchmark checks that before timing). No failure
handling: every rank is active.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from elasticpg.ep.layout import FP8_BLOCK, quantize_fp8


class GlooDispatchCombine:
    def __init__(self, group: Any, world: int) -> None:
        self.group, self.world = group, world

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, n: int, num_experts: int,
                 use_fp8: bool) -> tuple:
        """(recv_x (fp8: (data, scales)), recv_count, handle), laid out as Buffer.dispatch's."""
        world, local = self.world, num_experts // self.world
        t, k = topk_idx.shape
        hidden = x.shape[1]
        tok = torch.arange(t).unsqueeze(1).expand(t, k)
        valid = topk_idx >= 0
        keys, sel_row = torch.unique(topk_idx[valid] * t + tok[valid], return_inverse=True)
        row_e, row_t = keys // t, keys % t
        send_counts = torch.bincount(row_e // local, minlength=world)
        if use_fp8:
            data, scales = quantize_fp8(x)
            payload = torch.cat([data.view(torch.uint8), scales.view(torch.uint8)], 1)
        else:
            payload = x.contiguous().view(torch.uint8)
        meta = torch.stack([row_e % local, row_t], 1).to(torch.int32).view(torch.uint8)
        rows = torch.cat([meta, payload.index_select(0, row_t)], 1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        got = torch.empty(int(recv_counts.sum()), rows.shape[1], dtype=torch.uint8)
        dist.all_to_all_single(got, rows, recv_counts.tolist(), send_counts.tolist(),
                               group=self.group)
        # received grouped by source, each source's rows by (expert, token): a stable sort
        # by local expert gives each expert's rows grouped by source, then token
        meta_in = got[:, :8].contiguous().view(torch.int32).long()
        le, token = meta_in[:, 0], meta_in[:, 1]
        order = torch.argsort(le, stable=True)
        recv_count = torch.bincount(le, minlength=local)
        starts = torch.cumsum(recv_count, 0) - recv_count
        le_sorted = le.index_select(0, order)
        stride = world * n
        flat = le_sorted * stride + torch.arange(len(le)) - starts.index_select(0, le_sorted)
        body = got.index_select(0, order)[:, 8:]
        if use_fp8:
            recv_x = torch.empty(local, stride, hidden, dtype=torch.float8_e4m3fn)
            recv_x.view(torch.uint8).view(-1, hidden).index_copy_(0, flat, body[:, :hidden])
            sc = torch.empty(local, hidden // FP8_BLOCK, stride).transpose(1, 2)
            sc_rows = body[:, hidden:].contiguous().view(torch.float32)
            sc[flat // stride, flat % stride] = sc_rows
            out_x: Any = (recv_x, sc)
        else:
            out_x = torch.empty(local, stride, hidden, dtype=x.dtype)
            out_x.view(-1, hidden).index_copy_(0, flat, body.contiguous().view(x.dtype))
        src_info = torch.full((local, stride), -1, dtype=torch.int32)
        src_info.view(-1).index_copy_(0, flat, token.index_select(0, order).to(torch.int32))
        handle = (send_counts, recv_counts, row_t, sel_row, valid, order, flat)
        return out_x, recv_count.to(torch.int32), handle

    def combine(self, y: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                dtype: torch.dtype) -> torch.Tensor:
        send_counts, recv_counts, row_t, sel_row, valid, order, flat = handle
        hidden = y.shape[2]
        back = torch.empty(len(order), hidden, dtype=y.dtype)
        # in the order the rows arrived
        back.index_copy_(0, order, y.view(-1, hidden).index_select(0, flat))
        answers = torch.empty(len(row_t), hidden, dtype=y.dtype)
        dist.all_to_all_single(answers, back, send_counts.tolist(), recv_counts.tolist(),
                               group=self.group)
        row_w = torch.zeros(len(row_t), dtype=torch.float32)
        row_w.index_add_(0, sel_row, topk_weights[valid].to(torch.float32))
        combined = torch.zeros(len(valid), hidden, dtype=torch.float32)
        combined.index_add_(0, row_t, answers.float() * row_w.unsqueeze(1))
        return combined.to(dtype)
