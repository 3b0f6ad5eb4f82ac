"""ElasticProcessGroup: the torch.distributed.ProcessGroup that `init_process_group("elasticpg")`
returns. torch's Python layer calls these methods by name (SPEC section 2, platform notes).

Each method validates its arguments at the caller (clear exceptions, never a hang), stages CUDA
tensors through host memory, asks the runtime for an OpContext and runs the algorithm.
Collectives and sends run on the calling thread and return a completed Work; receives are truly
asynchronous and complete when their frame arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist

from ..collectives import algorithms as alg
from ..collectives import hierarchical as hier
from ..collectives import shm_algorithms as shm_alg
from ..collectives.context import OpContext, OpSpec
from ..core.dtypes import SUPPORTED_DTYPES, dtype_code, dtype_name
from ..core.framing import Header, MsgType, OpKind
from ..core.group_state import Call
from ..core.membership import ExecMode
from ..core.reduction import Reduce, check_supported, from_torch
from ..core.schedules import even_splits, split_offsets
from ..errors import ElasticPGError, GroupStateError, PeerFailedError
from ..group.runtime import GroupRuntime
from ..options import Options
from ..transport.tcp import tensor_bytes
from .work import ElasticWork

BACKEND_NAME = "elasticpg"


_DTYPES = frozenset(SUPPORTED_DTYPES)


def _plain_cpu(t: object) -> bool:
    """A dense, contiguous CPU tensor of a supported dtype, outside autograd: usable as it is
    (no staging)."""
    return (type(t) is torch.Tensor and t.is_cpu and t.layout is torch.strided
            and t.dtype in _DTYPES and not t.requires_grad and t.is_contiguous())


class _Staging:
    """Host copies of CUDA tensors (correct, not fast); CPU tensors pass through untouched."""

    def __init__(self) -> None:
        self.copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []

    def host(self, t: torch.Tensor, name: str, output: bool) -> torch.Tensor:
        if _plain_cpu(t):
            return t  # the common case, checked first: this runs on every collective
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on {t.device}; elasticpg supports cpu and cuda")
        if t.is_sparse:
            raise ValueError(f"{name}: sparse tensors are not supported")
        dtype_code(t.dtype)  # raises TypeError for an unsupported dtype
        # A Parameter or a tensor that requires grad: communication is not part of the graph
        # (as with every c10d backend), so work on its data.
        if t.device.type == "cpu" and t.is_contiguous():
            return t.detach()
        # CUDA, or a strided view (a slice, a transpose): a dense host copy, and for an
        # output the result written back through the original strides afterwards
        h = t.detach().to("cpu", memory_format=torch.contiguous_format).contiguous()
        if output:
            self.copy_back.append((h, t))
        return h

    def finish(self) -> None:
        for h, t in self.copy_back:
            t.detach().copy_(h)


def _either(over_shm: Callable, over_tcp: Callable, *args) -> Callable[[OpContext], None]:
    """The body of a collective: the shared-memory algorithm when the runtime attached a
    ShmOp to the context (every participant on this host), the TCP one otherwise."""

    def body(ctx: OpContext) -> None:
        if ctx.shm is not None:
            over_shm(ctx.shm, *args)
        else:
            over_tcp(ctx, *args)

    return body


def _one(tensors: Sequence[torch.Tensor] | torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor):
        return tensors
    if len(tensors) != 1:
        raise ValueError(f"{what}: expected exactly one tensor per process, got {len(tensors)}")
    return tensors[0]


def _same(a: torch.Tensor, b: torch.Tensor, what: str, numel: int | None = None) -> None:
    if a.dtype != b.dtype:
        raise ValueError(f"{what}: dtype {b.dtype} differs from {a.dtype}")
    if numel is not None and b.numel() != numel:
        raise ValueError(f"{what}: has {b.numel()} elements, expected {numel}")


# (torch op type, dtype) -> our reduce op, for pairs that passed the checks once
_CHECKED_REDOPS: dict[tuple[object, torch.dtype], Reduce] = {}


class ElasticProcessGroup(dist.ProcessGroup):
    def __init__(self, store: dist.Store, rank: int, size: int, timeout: timedelta,
                 group_id: str = "", options: Options | None = None) -> None:
        super().__init__(rank, size)
        self.runtime = GroupRuntime(store, rank, size, group_id or "default",
                                    timeout.total_seconds(), options or Options())
        self._coalesced: list[ElasticWork] | None = None
        self._send_seq = 0  # numbers this group's sends, for their acknowledgements

    # ---- identity -----------------------------------------------------------------------------
    def size(self) -> int:
        """What `dist.get_world_size()` reports: the extent of the active rank space (highest
        active rank + 1), so a scale-up that activates reserved slots grows it; the slot
        capacity (max_group_size) is only reserved room. An isolated rank (before its
        join_group) reports the world size it declared."""
        rt = self.runtime
        active = rt.view.active
        if rt.mode == ExecMode.ISOLATED or not active:
            return rt.world_size
        return active[-1] + 1

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND_NAME

    def name(self) -> str:
        return BACKEND_NAME

    def _get_backend(self, device: torch.device) -> ElasticProcessGroup:
        return self

    # torch stores names on the backend it registers; for a Python group it registers none,
    # so the names live here (destroy_process_group(subgroup) needs group_name)
    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def group_name(self) -> str:
        return getattr(self, "_group_name", self.runtime.group_id)

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = desc

    @property
    def group_desc(self) -> str:
        return getattr(self, "_group_desc", "")

    def shutdown(self) -> None:
        self.runtime.destroy()

    def abort(self) -> None:
        self.runtime.destroy()

    def _set_sequence_number_for_group(self) -> None:
        pass

    # ---- plumbing -----------------------------------------------------------------------------
    def _collective(self, spec: OpSpec, staging: _Staging, outputs: Sequence[torch.Tensor],
                    body: Callable[[OpContext], None],
                    parts: tuple[int, ...] | None = None) -> ElasticWork:
        """Run `body` as one collective over `parts` (the participants the caller laid its
        buffers out for; None: whoever is active when it starts)."""
        rt = self.runtime
        lane = rt.lane()
        if lane is not None and (parts is None or parts == lane.ctx.participants):
            ctx = rt.run(lane.begin(spec), body)
        else:
            ctx = rt.run_op(spec, body, parts)
        staging.finish()
        return self._track(ElasticWork.completed(outputs, ctx.failed_peers, rt.slots,
                                                 incomplete=bool(ctx.failed)))

    def _combined(self, outputs: Sequence, works: list[ElasticWork]) -> ElasticWork:
        """One completed work for several (coalesced forms, batches): it reports every peer an
        inner operation saw fail, and no success if any inner one fell short."""
        for w in works:
            w.wait()
        return ElasticWork.completed(outputs, {r for w in works for r in w.failed_ranks},
                                     self.runtime.slots,
                                     incomplete=not all(w.local_success for w in works))

    def _track(self, work: ElasticWork) -> ElasticWork:
        if self._coalesced is not None:
            self._coalesced.append(work)
        return work

    def _parts_for(self, entries: int) -> tuple[int, ...]:
        """prepare(); if the caller sized its buffers for fewer participants (`entries`) than
        this rank's view has, a member it knows is gone may not have been seen failing here
        yet: give that failure a bounded moment (failure_timeout) to show, then prepare again."""
        rt = self.runtime
        parts = rt.prepare()
        if 0 < entries < len(parts) and entries not in (rt.slots, self.size()):
            rt.await_fewer(entries, rt.failure_timeout)
            parts = rt.prepare()
        return parts

    def _slots_for(self, n: int, what: str, parts: tuple[int, ...]) -> list[int]:
        """Map participant i to an index into a list of length n (slot- or active-indexed)."""
        if n == self.runtime.slots or (self.runtime.mode == ExecMode.ISOLATED
                                      and n == self.size()):
            return list(parts)
        if n == len(parts):
            return list(range(n))
        raise ValueError(f"{what}: list has {n} entries; expected one per slot "
                         f"({self.runtime.slots}) or per active rank ({len(parts)})")

    def _chunks_for(self, numel: int, chunk: int, what: str,
                    parts: tuple[int, ...]) -> tuple[int, list[int]]:
        """For a flat buffer of `numel` = k * chunk: (k, participant i -> chunk index)."""
        for k in (len(parts), self.runtime.slots, self.size()):
            if numel == k * chunk:
                slot_indexed = k != len(parts)
                return k, (list(parts) if slot_indexed else list(range(len(parts))))
        raise ValueError(f"{what}: buffer has {numel} elements; expected {len(parts)} x {chunk} "
                         f"(one chunk per active rank)")

    @staticmethod
    def _redop(opts: object, dtype: torch.dtype) -> Reduce:
        torch_op = opts.reduceOp
        key = (getattr(torch_op, "op", torch_op), dtype)
        op = _CHECKED_REDOPS.get(key)
        if op is None:
            op = from_torch(torch_op)
            check_supported(op, dtype)
            _CHECKED_REDOPS[key] = op
        return op

    def _root(self, root: int, parts: tuple[int, ...]) -> int:
        """The root among `parts`; an isolated rank is its own root (it runs over {self})."""
        if self.runtime.mode == ExecMode.ISOLATED:
            return self.rank()
        if root not in parts:
            why = self.runtime.mailbox.failed().get(root)
            raise ValueError(f"root rank {root} is not an active member of this group"
                             + (f" ({why})" if why else ""))
        return root

    # ---- collectives --------------------------------------------------------------------------
    def allreduce(self, tensors, opts=None) -> ElasticWork:
        opts = opts if opts is not None else dist.AllreduceOptions()
        st = _Staging()
        t = st.host(_one(tensors, "allreduce"), "tensor", output=True)
        op = self._redop(opts, t.dtype)
        spec = OpSpec(OpKind.ALLREDUCE, dtype_code(t.dtype), t.numel(), -1, op)
        return self._collective(spec, st, [t], _either(shm_alg.allreduce, hier.allreduce, t, op))

    def allreduce_coalesced(self, tensors, opts=None) -> ElasticWork:
        opts = opts if opts is not None else dist.AllreduceCoalescedOptions()
        return self._combined(tensors, [self.allreduce([t], opts) for t in tensors])

    def broadcast(self, tensors, opts=None) -> ElasticWork:
        opts = opts if opts is not None else dist.BroadcastOptions()
        st = _Staging()
        t = st.host(_one(tensors, "broadcast"), "tensor", output=True)
        parts = self.runtime.prepare()
        root = self._root(opts.rootRank, parts)
        spec = OpSpec(OpKind.BROADCAST, dtype_code(t.dtype), t.numel(), root)
        return self._collective(spec, st, [t],
                                _either(shm_alg.broadcast, hier.broadcast, t, root), parts)

    def reduce(self, tensors, opts=None) -> ElasticWork:
        opts = opts if opts is not None else dist.ReduceOptions()
        st = _Staging()
        t = st.host(_one(tensors, "reduce"), "tensor", output=True)
        parts = self.runtime.prepare()
        root = self._root(opts.rootRank, parts)
        op = self._redop(opts, t.dtype)
        spec = OpSpec(OpKind.REDUCE, dtype_code(t.dtype), t.numel(), root, op)
        return self._collective(spec, st, [t],
                                _either(shm_alg.reduce, alg.reduce, t, root, op), parts)

    def allgather(self, output_tensors, input_tensors, opts=None) -> ElasticWork:
        st = _Staging()
        t = st.host(_one(input_tensors, "allgather input"), "input", output=False)
        outs_dev = _one(output_tensors, "allgather output lists")
        outs = [st.host(o, f"output[{i}]", output=True) for i, o in enumerate(outs_dev)]
        for i, o in enumerate(outs):
            _same(t, o, f"all_gather output[{i}]", t.numel())
        parts = self._parts_for(len(outs))
        slot_of = self._slots_for(len(outs), "all_gather", parts)
        spec = OpSpec(OpKind.ALLGATHER, dtype_code(t.dtype), t.numel())
        return self._collective(spec, st, [outs_dev],
                                _either(shm_alg.allgather, hier.allgather, outs, t, slot_of), parts)

    def all_gather_single(self, output, input, opts=None) -> ElasticWork:  # noqa: A002
        st = _Staging()
        t = st.host(input, "input", output=False)
        out = st.host(output, "output", output=True)
        _same(t, out, "all_gather_into_tensor output")
        parts = self._parts_for(out.numel() // t.numel() if t.numel() else 0)
        k, slot_of = self._chunks_for(out.numel(), t.numel(), "all_gather_into_tensor", parts)
        outs = list(out.reshape(-1).chunk(k)) if t.numel() else [out.reshape(-1)[:0]] * k
        spec = OpSpec(OpKind.ALLGATHER_INTO_TENSOR, dtype_code(t.dtype), t.numel())
        return self._collective(spec, st, [output],
                                _either(shm_alg.allgather, hier.allgather, outs, t, slot_of), parts)

    _allgather_base = all_gather_single

    def allgather_coalesced(self, output_lists, input_tensors, opts=None) -> ElasticWork:
        return self._combined(output_lists, [
            self.allgather([outs], [t], opts)
            for outs, t in zip(output_lists, input_tensors, strict=True)])

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None) -> ElasticWork:
        return self._combined(outputs, [self.all_gather_single(o, t, opts)
                                        for o, t in zip(outputs, inputs, strict=True)])

    def reduce_scatter(self, output_tensors, input_tensors, opts=None) -> ElasticWork:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        st = _Staging()
        out = st.host(_one(output_tensors, "reduce_scatter output"), "output", output=True)
        ins = [st.host(x, f"input[{i}]", output=False)
               for i, x in enumerate(_one(input_tensors, "reduce_scatter input lists"))]
        for i, x in enumerate(ins):
            _same(out, x, f"reduce_scatter input[{i}]", out.numel())
        op = self._redop(opts, out.dtype)
        parts = self._parts_for(len(ins))
        slot_of = self._slots_for(len(ins), "reduce_scatter", parts)
        spec = OpSpec(OpKind.REDUCE_SCATTER, dtype_code(out.dtype), out.numel(), -1, op)
        return self._collective(spec, st, [out],
                                _either(shm_alg.reduce_scatter, alg.reduce_scatter, out, ins, op,
                                        slot_of), parts)

    def reduce_scatter_single(self, output, input, opts=None) -> ElasticWork:  # noqa: A002
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        st = _Staging()
        out = st.host(output, "output", output=True)
        t = st.host(input, "input", output=False)
        _same(out, t, "reduce_scatter_tensor input")
        op = self._redop(opts, out.dtype)
        parts = self._parts_for(t.numel() // out.numel() if out.numel() else 0)
        k, slot_of = self._chunks_for(t.numel(), out.numel(), "reduce_scatter_tensor", parts)
        ins = list(t.reshape(-1).chunk(k)) if out.numel() else [t.reshape(-1)[:0]] * k
        spec = OpSpec(OpKind.REDUCE_SCATTER_TENSOR, dtype_code(out.dtype), out.numel(), -1, op)
        return self._collective(spec, st, [output],
                                _either(shm_alg.reduce_scatter, alg.reduce_scatter, out, ins, op,
                                        slot_of), parts)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None) -> ElasticWork:
        return self._combined(outputs, [self.reduce_scatter_single(o, t, opts)
                                        for o, t in zip(outputs, inputs, strict=True)])

    def alltoall(self, output_tensors, input_tensors, opts=None) -> ElasticWork:
        st = _Staging()
        outs = [st.host(o, f"output[{i}]", output=True) for i, o in enumerate(output_tensors)]
        ins = [st.host(x, f"input[{i}]", output=False) for i, x in enumerate(input_tensors)]
        if len(outs) != len(ins):
            raise ValueError(f"all_to_all: {len(outs)} outputs but {len(ins)} inputs")
        if not outs:
            raise ValueError("all_to_all: empty tensor lists")
        for i, x in enumerate(outs + ins):
            _same(outs[0], x, f"all_to_all tensor {i}")
        parts = self.runtime.prepare()
        slot_of = self._slots_for(len(outs), "all_to_all", parts)
        spec = OpSpec(OpKind.ALLTOALL, dtype_code(outs[0].dtype), 0)
        return self._collective(spec, st, output_tensors,
                                _either(shm_alg.alltoall_list, alg.alltoall, outs, ins, slot_of),
                                parts)

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes,  # noqa: A002
                          opts=None) -> ElasticWork:
        st = _Staging()
        out = st.host(output, "output", output=True)
        t = st.host(input, "input", output=False)
        _same(out, t, "all_to_all_single output")
        parts = self.runtime.prepare()
        n = len(parts)
        out_rows = self._row_blocks(out, list(output_split_sizes), n, "output")
        in_rows = self._row_blocks(t, list(input_split_sizes), n, "input")
        if len(out_rows) != len(in_rows):
            raise ValueError("all_to_all_single: output and input splits have different lengths")
        slot_of = self._slots_for(len(out_rows), "all_to_all_single splits", parts)
        spec = OpSpec(OpKind.ALLTOALL_SINGLE, dtype_code(t.dtype), 0)

        def blocks(x: torch.Tensor, rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
            rb = x.nbytes // max(x.shape[0] if x.dim() else 1, 1)  # bytes per row
            return [(rows[i][0] * rb, rows[i][1] * rb) for i in slot_of]

        # over shared memory the blocks stay byte ranges of the two buffers; TCP sends tensors
        over_shm = partial(shm_alg.alltoall_bytes, out, t, blocks(out, out_rows),
                           blocks(t, in_rows))
        return self._collective(spec, st, [output], _either(
            over_shm, lambda ctx: alg.alltoall(ctx, self._rows(out, out_rows),
                                               self._rows(t, in_rows), slot_of)), parts)

    alltoall_base = all_to_all_single

    @staticmethod
    def _row_blocks(t: torch.Tensor, splits: list[int], n: int,
                    what: str) -> list[tuple[int, int]]:
        """(first row, rows) of each block of `t`, by split sizes or evenly over n ranks."""
        rows = t.shape[0] if t.dim() else 1
        if not splits:
            if rows % n:
                raise ValueError(f"all_to_all_single: {what} has {rows} rows, not divisible by "
                                 f"{n} ranks; pass split sizes")
            return even_splits(rows, n)
        if sum(splits) != rows:
            raise ValueError(f"all_to_all_single: {what} split sizes {splits} sum to "
                             f"{sum(splits)}, but the tensor has {rows} rows")
        return split_offsets(splits)

    @staticmethod
    def _rows(t: torch.Tensor, blocks: list[tuple[int, int]]) -> list[torch.Tensor]:
        rows = t.shape[0] if t.dim() else 1
        row = t.numel() // rows if rows else 0
        flat = t.reshape(-1)
        return [flat[o * row:(o + c) * row] for o, c in blocks]

    def gather(self, output_tensors, input_tensors, opts=None) -> ElasticWork:
        opts = opts if opts is not None else dist.GatherOptions()
        st = _Staging()
        t = st.host(_one(input_tensors, "gather input"), "input", output=False)
        parts = self.runtime.prepare()
        root = self._root(opts.rootRank, parts)
        outs: list[torch.Tensor] = []
        slot_of: list[int] = []
        if self.rank() == root:
            outs_dev = _one(output_tensors, "gather output lists")
            outs = [st.host(o, f"output[{i}]", output=True) for i, o in enumerate(outs_dev)]
            for i, o in enumerate(outs):
                _same(t, o, f"gather output[{i}]", t.numel())
            slot_of = self._slots_for(len(outs), "gather", parts)
        elif output_tensors and any(len(x) for x in output_tensors):
            raise ValueError("gather: only the root passes a gather_list")
        spec = OpSpec(OpKind.GATHER, dtype_code(t.dtype), t.numel(), root)
        return self._collective(spec, st, output_tensors,
                                _either(shm_alg.gather, alg.gather, outs, t, root, slot_of), parts)

    def scatter(self, output_tensors, input_tensors, opts=None) -> ElasticWork:
        opts = opts if opts is not None else dist.ScatterOptions()
        st = _Staging()
        out = st.host(_one(output_tensors, "scatter output"), "output", output=True)
        parts = self.runtime.prepare()
        root = self._root(opts.rootRank, parts)
        ins: list[torch.Tensor] = []
        slot_of: list[int] = []
        if self.rank() == root:
            ins = [st.host(x, f"input[{i}]", output=False)
                   for i, x in enumerate(_one(input_tensors, "scatter input lists"))]
            for i, x in enumerate(ins):
                _same(out, x, f"scatter input[{i}]", out.numel())
            slot_of = self._slots_for(len(ins), "scatter", parts)
        elif input_tensors and any(len(x) for x in input_tensors):
            raise ValueError("scatter: only the root passes a scatter_list")
        spec = OpSpec(OpKind.SCATTER, dtype_code(out.dtype), out.numel(), root)
        return self._collective(spec, st, [out],
                                _either(shm_alg.scatter, alg.scatter, out, ins, root, slot_of),
                                parts)

    def barrier(self, opts=None) -> ElasticWork:
        return self._collective(OpSpec(OpKind.BARRIER), _Staging(), [],
                                _either(shm_alg.barrier, alg.barrier))

    # ---- point to point -----------------------------------------------------------------------
    def _p2p_peer(self, peer: int, what: str) -> None:
        rt = self.runtime
        rt.refuse(Call.P2P)
        if not 0 <= peer < rt.slots:
            raise ValueError(f"{what}: rank {peer} is outside the group (0..{rt.slots - 1})")
        if not rt.view.is_active(peer):
            raise GroupStateError(f"{what}: rank {peer} is not active in this group")

    def send(self, tensors, dstRank: int, tag: int) -> ElasticWork:  # noqa: N803
        """Completes when the receiving process acknowledges the message (not when its bytes
        reach a socket buffer), so a send to a rank that has gone completes unsuccessfully."""
        st = _Staging()
        t = st.host(_one(tensors, "send"), "tensor", output=False)
        self._p2p_peer(dstRank, "send")
        rt = self.runtime
        payload = tensor_bytes(t)
        self._send_seq += 1
        seq = self._send_seq
        header = Header(MsgType.P2P, self.rank(), len(payload), OpKind.SEND,
                        dtype_code(t.dtype), seq=seq, numel=t.numel(), tag=tag)
        work = ElasticWork([t], rt.timeout,
                           on_timeout=partial(rt.mailbox.cancel_ack, dstRank, seq))
        work.group_slots = rt.slots
        work.before_block = rt.release_links
        rt.release_links()  # its acknowledgement comes through a reader: see release_links
        acked = dstRank == self.rank()  # to itself: delivered in send_frame, nothing to await
        if not acked:
            rt.mailbox.expect_ack(dstRank, seq, partial(self._acked, work))
        started = time.perf_counter()
        try:
            rt.send_frame(dstRank, header, payload, rt.p2p_deadline())
        except PeerFailedError as exc:
            rt.mailbox.cancel_ack(dstRank, seq)
            rt.op_saw_failure(exc.ranks)
            work.finish(exc, failed=exc.ranks)
        else:
            rt.metrics.op(OpKind.SEND, len(payload), time.perf_counter() - started)
            if acked:
                work.finish()
        return self._track(work)

    def _acked(self, work: ElasticWork, error: BaseException | None) -> None:
        if isinstance(error, PeerFailedError):
            self.runtime.op_saw_failure(error.ranks)
        work.finish(error, failed=getattr(error, "ranks", ()))

    def recv(self, tensors, srcRank: int, tag: int) -> ElasticWork:  # noqa: N803
        self._p2p_peer(srcRank, "recv")
        return self._post_recv(tensors, srcRank, tag)

    def recv_anysource(self, tensors, tag: int) -> ElasticWork:
        self.runtime.refuse(Call.P2P)
        return self._post_recv(tensors, None, tag)

    def _post_recv(self, tensors, src: int | None, tag: int) -> ElasticWork:
        st = _Staging()
        t = st.host(_one(tensors, "recv"), "tensor", output=True)
        mailbox = self.runtime.mailbox
        work = ElasticWork([_one(tensors, "recv")], self.runtime.timeout,
                           on_timeout=lambda: mailbox.cancel_p2p(on_done))
        work.group_slots = self.runtime.slots
        work.before_block = self.runtime.release_links
        self.runtime.release_links()  # its frame comes through a reader: see release_links
        work.add_finalizer(st.finish)
        metrics, started = self.runtime.metrics, time.perf_counter()

        def on_done(frame, error) -> None:
            if error is not None:
                if isinstance(error, PeerFailedError):
                    self.runtime.op_saw_failure(error.ranks)
                work.finish(error, failed=getattr(error, "ranks", ()))
                return
            header, payload = frame
            if header.dtype != dtype_code(t.dtype) or header.numel != t.numel():
                work.finish(ElasticPGError(
                    f"recv from rank {header.src} (tag {tag}): got {header.numel} elements of "
                    f"{dtype_name(header.dtype)}, expected {t.numel()} of {t.dtype}"))
                return
            if t.numel():
                t.reshape(-1).copy_(payload.view(t.dtype))
            work.src = header.src
            metrics.recv(header.nbytes, time.perf_counter() - started)
            work.finish()

        mailbox.post_p2p(src, tag, on_done)
        return self._track(work)

    # ---- coalescing (torch's _coalescing_manager) ---------------------------------------------
    def _start_coalescing(self, device: torch.device) -> None:
        self._coalesced = []

    def _end_coalescing(self, device: torch.device) -> ElasticWork:
        works, self._coalesced = self._coalesced or [], None
        return self._combined([], works)
