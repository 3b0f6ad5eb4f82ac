"""One serving rank of `elasticpg demo`, run by `elasticpg run` (python -m elasticpg.demo.worker).

Every step the ranks serve a batch of `ranks x tokens` requests, split over the active ranks
(when one is dead the survivors take its share). Each layer: gate -> `elasticpg.ep` dispatch
to the physical expert slots chosen by `placement.route` over the active ranks -> this rank's
expert MLPs -> combine. A step ends with one small all_reduce, the commit point:

    [contributors, disturbed, out of time, *mask used]  (SUM)

A step is committed when no rank saw a peer fail inside it and every contributor used the same
mask; otherwise every survivor discards its outputs and serves the same requests again with the
new mask (those requests are delayed, never dropped). Then, in deferred mode, the healthy
ranks admit a ready joiner (`admit_ready_ranks`, collective at that same point); in sync mode,
once a rank is missing, they stop serving and wait in a group-wide recovery phase until the
replacement has warmed up and is admitted (the way recovery worked before deferred join).

The replacement (started by the launcher in the dead rank's slot) loads its experts, warms up
in isolation doing forward passes through them, calls `join_group`, and serves from the next
step on. What happens is printed as `@demo {json}` lines that `elasticpg demo` reads.
"""

from __future__ import annotations

import time

IMPORTED = time.time()  # when this module began: after python and elasticpg (torch) loaded

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import elasticpg  # noqa: E402
from elasticpg.launcher.environment import restart_count  # noqa: E402

from .model import ExpertShard, Gate, ReferenceModel, request_inputs  # noqa: E402
from .settings import DemoSettings  # noqa: E402

EVENT_PREFIX = "@demo "
SYNC_POLL = 0.005  # seconds between recovery-phase rounds in sync mode (pacing, not a wait)


def process_start() -> float:
    """When this process was created (Linux: its /proc start time, in clock ticks since boot,
    against CLOCK_BOOTTIME now), so a replacement's start-to-active includes starting Python
    and importing torch; elsewhere the time this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return IMPORTED


STARTED = process_start()


def emit(kind: str, **fields: object) -> None:
    print(EVENT_PREFIX + json.dumps({"ev": kind, "t": time.time(), **fields}), flush=True)


def share(batch: int, mask: list[int], rank: int) -> tuple[int, int]:
    """This rank's [begin, end) of a step's `batch` requests, split over the active ranks."""
    active = [r for r, a in enumerate(mask) if a]
    i, n = active.index(rank), len(active)
    base, extra = divmod(batch, n)
    begin = i * base + min(i, extra)
    return begin, begin + base + (1 if i < extra else 0)


class Rank:
    def __init__(self, s: DemoSettings) -> None:
        from elasticpg.ep import Buffer

        self.s = s
        self.rank = dist.get_rank()
        self.placement = s.placement()
        self.shape = s.shape()
        self.replacement = elasticpg.is_replacement()
        t = time.time()
        self.experts = ExpertShard(self.shape, self.placement.local_slots(self.rank))
        self.gates = [Gate(self.shape, layer) for layer in range(s.layers)]
        emit("loaded", rank=self.rank, seconds=time.time() - t,
             experts=self.placement.local_slots(self.rank))
        self.reference = ReferenceModel(self.shape)
        size = Buffer.get_ep_buffer_size_hint(s.max_tokens_per_rank, s.hidden, s.ranks,
                                              self.placement.num_slots)
        self.buffer = Buffer(dist.group.WORLD, size)
        self.timeout_us = int(s.op_timeout * 1e6)
        self.step = 0
        self.full_steps = 0  # committed steps at full strength since the last mask change
        self.deadline = time.monotonic() + s.timeout
        self.seen_t = 0.0

    # ---- one forward pass ---------------------------------------------------------------------
    def layers(self, h: torch.Tensor, ids: torch.Tensor, mask: list[int],
               kill_now: bool = False, partial: bool = False
               ) -> tuple[torch.Tensor, bool, int, str]:
        """Every layer over the ranks in `mask`: (outputs, disturbed, rows this rank's experts
        received, where a failure was first seen)."""
        s = self.s
        active = torch.tensor(mask, dtype=torch.int32)
        received, seen, seen_t = 0, "", 0.0
        for layer, gate in enumerate(self.gates):
            picks, weights = gate(h)
            slots = self.placement.route(picks, ids, mask, partial)
            recv_x, recv_count, handle, _, _ = self.buffer.dispatch(
                h, slots, active, s.max_tokens_per_rank, self.placement.num_slots,
                self.timeout_us, use_fp8=False)
            if kill_now and layer == s.layers // 2:
                emit("kill", rank=self.rank, step=self.step, layer=layer)
                os.kill(os.getpid(), signal.SIGKILL)  # for real: no cleanup, no goodbye
            if not seen and int(active.sum()) < sum(mask):
                seen, seen_t = f"dispatch, layer {layer}", time.time()
            received += int(recv_count.sum())
            out = self.experts.run(layer, recv_x, recv_count)
            combined, _, _ = self.buffer.combine(out, slots, weights, active, self.timeout_us,
                                                 handle)
            if not seen and int(active.sum()) < sum(mask):
                seen, seen_t = f"combine, layer {layer}", time.time()
            h = h + combined
        self.seen_t = seen_t
        return h, bool(seen), received, seen

    def check(self, ids: torch.Tensor, out: torch.Tensor) -> float:
        """max |served - reference| / max |reference| over this rank's requests."""
        ref = self.reference.forward(ids)
        return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-12))

    # ---- the serving loop ---------------------------------------------------------------------
    def mask(self) -> list[int]:
        return [int(a) for a in elasticpg.get_active_ranks().tolist()[: self.s.ranks]]

    def serve(self) -> None:
        s = self.s
        mask = self.mask()
        last_mask = list(mask)
        attempt, since_change = 0, 0  # committed steps since the mask last changed
        while True:
            begin, end = share(s.batch, mask, self.rank)
            first = self.step * s.batch
            ids = torch.arange(first + begin, first + end)
            kill_now = (self.rank == s.kill_rank and not self.replacement
                        and self.step == s.kill_step)
            t0 = time.time()
            out, disturbed, received, seen = self.layers(request_inputs(self.shape, ids), ids,
                                                         mask, kill_now)
            t1 = time.time()
            if seen:
                emit("failure_seen", rank=self.rank, step=self.step, where=seen,
                     seen_t=self.seen_t, mask=self.mask())
            late = time.monotonic() > self.deadline
            vote = torch.tensor([1.0, float(disturbed), float(late), *map(float, mask)])
            work = dist.all_reduce(vote, async_op=True)
            work.wait()
            n = vote[0].item()
            agreed = all(v == n * m for v, m in zip(vote[3:].tolist(), mask, strict=True))
            committed = vote[1].item() == 0 and agreed
            checked = None
            if committed and (self.step % s.check_every == 0 or attempt > 0
                              or mask != last_mask or since_change < 3):
                checked = self.check(ids, out)
            emit("step", rank=self.rank, step=self.step, attempt=attempt, t0=t0, t1=t1,
                 committed=committed, begin=first + begin, end=first + end, mask=mask,
                 epoch=elasticpg.get_current_epoch(), received=received, err=checked)
            if committed:
                since_change = since_change + 1 if mask == last_mask else 1
                last_mask = list(mask)
                self.full_steps = self.full_steps + 1 if all(mask) else 0
                self.step += 1
                attempt = 0
            else:
                attempt += 1
            if vote[2].item() > 0 or (self.step >= s.steps and self.full_steps >= s.after_steps):
                break
            if s.join_mode == "sync" and not all(self.mask()):
                self.recover_sync()
            else:
                self.admit()
            mask = self.mask()
        emit("done", rank=self.rank, step=self.step, out_of_time=vote[2].item() > 0)

    def admit(self) -> bool:
        """Deferred join, healthy side: admit whoever is ready, at the same point on every
        member; the stall is what the healthy ranks pay for it."""
        t0 = time.time()
        admitted = elasticpg.admit_ready_ranks()
        if not admitted:
            return False
        self.buffer.update_ep_member()
        self.sync_step()
        emit("admitted", rank=self.rank, step=self.step, ranks=admitted, t0=t0,
             stall=time.time() - t0, mask=self.mask(), epoch=elasticpg.get_current_epoch())
        return True

    def recover_sync(self) -> None:
        """Sync mode: serve nothing until the replacement has warmed up and is admitted; each
        round is a collective (readiness is agreed at collectives), bounded by the run's
        deadline."""
        t0 = time.time()
        emit("recovery_phase", rank=self.rank, step=self.step, t0=t0)
        rounds = 0
        while not self.admit():
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"rank {self.rank}: no replacement was admitted within "
                                   f"--timeout {self.s.timeout:g} s")
            dist.all_reduce(torch.zeros(1))
            rounds += 1
            time.sleep(SYNC_POLL)
        emit("recovery_done", rank=self.rank, step=self.step, t0=t0,
             waited=time.time() - t0, rounds=rounds)

    def sync_step(self) -> None:
        """After an admission every member (the joiner included) learns where serving is."""
        where = torch.tensor([float(self.step), float(self.full_steps)])
        dist.all_reduce(where, op=dist.ReduceOp.MAX)
        self.step, self.full_steps = int(where[0].item()), 0

    # ---- the replacement ----------------------------------------------------------------------
    def warm_up_and_join(self) -> None:
        """Real work in isolation for --warmup seconds: forward passes on random tokens through
        the gates, the EP dispatch/combine (isolated: over this rank only) and this rank's
        experts (picks of experts it does not hold are masked); its collectives are local."""
        s = self.s
        probe = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(probe)
        emit("warmup_start", rank=self.rank, isolated=probe.item() == self.rank + 1)
        alone = [int(r == self.rank) for r in range(s.ranks)]
        g = torch.Generator().manual_seed(self.rank)
        passes, t_end = 0, time.monotonic() + s.warmup
        while passes == 0 or time.monotonic() < t_end:
            h = torch.randn(s.max_tokens_per_rank, s.hidden, generator=g)
            self.layers(h, torch.arange(len(h)), alone, partial=True)
            passes += 1
        emit("warmup_end", rank=self.rank, passes=passes)
        t0 = time.time()
        elasticpg.join_group(timeout=s.timeout)
        if not self.mask()[self.rank] or sum(self.mask()) < 2:
            raise RuntimeError(f"rank {self.rank}: join_group returned but this process's "
                               f"view is {self.mask()} (epoch "
                               f"{elasticpg.get_current_epoch()}): not admitted beside the "
                               f"healthy ranks")
        self.buffer.update_ep_member()
        self.sync_step()
        emit("active", rank=self.rank, started=STARTED, join_called=t0, step=self.step,
             mask=self.mask(), epoch=elasticpg.get_current_epoch())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    s = DemoSettings.from_json(args[0])
    torch.set_num_threads(1)
    emit("start", rank=int(os.environ.get("RANK", "-1")), pid=os.getpid(), started=STARTED,
         imported=IMPORTED, restart=restart_count(), replacement=elasticpg.is_replacement())
    dist.init_process_group("elasticpg", timeout=timedelta(seconds=s.op_timeout))
    try:
        me = Rank(s)
        if me.replacement:
            me.warm_up_and_join()
        me.serve()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C forwarded by the launcher: leave quietly
        sys.exit(130)
