"""Where each expert lives, and which replica a token's selection goes to (pure: no I/O).

The EP layer (`elasticpg.ep.Buffer`) knows only *physical* expert slots: with R ranks and L
slots per rank, slot p lives on rank p // L. The model has E *logical* experts; EPLB-style
redundancy places each logical expert on `replicas` different ranks, so that when one rank
dies every expert still has a live copy. A gate picks logical experts; `route` turns each pick
into a physical slot on an active rank, spreading a hot expert's tokens over its live replicas
(token id modulo the number of live replicas: deterministic, so every rank and the reference
agree, and even in expectation). When the active set changes, routing is recomputed from the
mask alone: that is the re-balancing after a failure and after a join.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class PlacementError(ValueError):
    """An expert layout that cannot be built (counts that do not divide, too few ranks)."""


@dataclass(frozen=True)
class Placement:
    num_ranks: int
    num_experts: int  # logical experts per layer
    replicas: int  # copies of each logical expert, each on a different rank

    def __post_init__(self) -> None:
        r, e, k = self.num_ranks, self.num_experts, self.replicas
        if r < 1 or e < 1 or k < 1:
            raise PlacementError(f"ranks ({r}), experts ({e}) and replicas ({k}) must be >= 1")
        if k > r:
            raise PlacementError(f"{k} replicas of each expert need {k} different ranks, "
                                 f"there are {r}")
        if (e * k) % r:
            raise PlacementError(f"{e} experts x {k} replicas = {e * k} expert slots do not "
                                 f"divide evenly over {r} ranks")

    @property
    def slots_per_rank(self) -> int:
        """L of the EP layer: physical expert slots on each rank."""
        return self.num_experts * self.replicas // self.num_ranks

    @property
    def num_slots(self) -> int:
        """The `num_experts` the EP layer is given: every physical slot."""
        return self.num_experts * self.replicas

    def rank_of_copy(self, copy: int, expert: int) -> int:
        """The rank that holds copy `copy` of logical expert `expert`.

        With E a multiple of R and two copies (the default), expert j's first copy is on rank
        j mod R and its second rotated by 1 + (j // R) mod (R - 1) ranks: never the same rank,
        each rank gets one expert of every block of R, and the backups of one rank's experts
        are spread over several other ranks (a dead rank's load does not all land on one
        survivor). Otherwise copies are laid out positionally (copy c of expert j at position
        c * E + j of the slot sequence), which puts them on different ranks because E >= L."""
        r, e = self.num_ranks, self.num_experts
        if self.replicas == 2 and e % r == 0 and r > 1:
            shift = 0 if copy == 0 else 1 + (expert // r) % (r - 1)
            return (expert + shift) % r
        return (copy * e + expert) // self.slots_per_rank

    def logical_of_slot(self) -> list[int]:
        """slot -> the logical expert it holds (each rank's slots in (copy, expert) order)."""
        per_rank: list[list[int]] = [[] for _ in range(self.num_ranks)]
        for c in range(self.replicas):
            for j in range(self.num_experts):
                per_rank[self.rank_of_copy(c, j)].append(j)
        return [j for held in per_rank for j in held]

    def rank_of_slot(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def slots_of_expert(self) -> list[list[int]]:
        """logical expert -> its physical slots, in copy order."""
        table: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, j in enumerate(self.logical_of_slot()):
            table[j].append(slot)
        return table

    def local_slots(self, rank: int) -> list[int]:
        """The logical expert in each of `rank`'s L slots (what that rank must load)."""
        lo = rank * self.slots_per_rank
        return self.logical_of_slot()[lo:lo + self.slots_per_rank]

    def live_slots(self, active: Sequence[int], partial: bool = False) -> list[list[int]]:
        """logical expert -> its slots on active ranks. Raises when an expert has none left
        (its output could not be computed: the demo's outputs would silently change), unless
        `partial` (a replacement's isolated warm-up, which reaches only its own experts)."""
        if len(active) != self.num_ranks:
            raise PlacementError(f"active mask has {len(active)} entries, expected "
                                 f"{self.num_ranks}")
        table = [[s for s in slots if active[self.rank_of_slot(s)]]
                 for slots in self.slots_of_expert()]
        lost = [j for j, slots in enumerate(table) if not slots]
        if lost and not partial:
            raise PlacementError(f"expert(s) {lost} have no replica on an active rank "
                                 f"(active={list(active)})")
        return table

    def route(self, logical_idx: torch.Tensor, token_ids: torch.Tensor,
              active: Sequence[int], partial: bool = False) -> torch.Tensor:
        """[T, k] logical picks (-1 = none) -> [T, k] physical slots on active ranks.

        Pick (t, i) of expert j goes to live replica (token_ids[t] + i) mod n_live(j): a
        token's picks of different experts spread independently, and replicas share a hot
        expert evenly. With `partial`, picks of experts with no live copy become -1."""
        live = self.live_slots(active, partial)
        width = max(1, *(len(s) for s in live))
        table = torch.full((self.num_experts, width), -1, dtype=torch.int64)
        counts = torch.empty(self.num_experts, dtype=torch.int64)
        for j, slots in enumerate(live):
            table[j, :len(slots)] = torch.tensor(slots)
            counts[j] = max(len(slots), 1)  # a lost expert's row is all -1
        if logical_idx.numel() == 0:
            return logical_idx.to(torch.int64).clone()
        picks = logical_idx.to(torch.int64)
        valid = picks >= 0
        j = picks.clamp(min=0)
        offset = token_ids.to(torch.int64).unsqueeze(1) + torch.arange(picks.shape[1])
        choice = table[j, offset % counts[j]]
        return torch.where(valid, choice, torch.full_like(choice, -1))
