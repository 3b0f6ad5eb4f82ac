"""The demo's mixture-of-experts model: real MLP experts, a top-k gate, several layers.

Every weight is a function of (seed, layer, expert) only, so any process builds bit-identical
copies of the experts it hosts (a replica, a replacement "loading its checkpoint") and of the
whole model (the single-process reference the served outputs are checked against). The input
of request i is a function of (seed, i) too: the reference needs nothing from the servers but
request ids.

A layer is h <- h + sum_k w_k * expert_{j_k}(h), with the gate's top-k softmax weights
renormalised over the k picks before dispatch (the EP combine itself never renormalises).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Expert = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    ffn: int
    num_experts: int  # logical experts per layer
    top_k: int
    layers: int
    seed: int = 1234


def _generator(*key: int) -> torch.Generator:
    g = torch.Generator()
    seed = 0
    for part in key:  # a small mixing function: distinct keys give distinct streams
        seed = (seed * 1_000_003 + part + 1) % (2 ** 62)
    g.manual_seed(seed)
    return g


class ExpertMLP:
    """SiLU MLP hidden -> ffn -> hidden; its weights are those of (seed, layer, expert)."""

    def __init__(self, shape: ModelShape, layer: int, expert: int) -> None:
        g = _generator(shape.seed, 1, layer, expert)
        self.w1 = torch.randn(shape.hidden, shape.ffn, generator=g) / shape.hidden ** 0.5
        self.w2 = torch.randn(shape.ffn, shape.hidden, generator=g) / shape.ffn ** 0.5

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x @ self.w1) @ self.w2


class Gate:
    def __init__(self, shape: ModelShape, layer: int) -> None:
        g = _generator(shape.seed, 2, layer)
        self.w = torch.randn(shape.hidden, shape.num_experts, generator=g)
        self.k = shape.top_k

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, hidden] -> (logical picks int64 [T, k], weights float32 [T, k] summing to 1)."""
        probs = torch.softmax(h @ self.w, dim=-1)
        weights, picks = torch.topk(probs, self.k, dim=-1)
        return picks, weights / weights.sum(dim=-1, keepdim=True)


def request_inputs(shape: ModelShape, ids: torch.Tensor) -> torch.Tensor:
    """[T] request ids -> [T, hidden] float32 inputs (one generator per request)."""
    rows = [torch.randn(shape.hidden, generator=_generator(shape.seed, 3, int(i)))
            for i in ids.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, shape.hidden)


class ExpertShard:
    """The experts one rank hosts: per layer, one MLP per EP slot (replicas are copies)."""

    def __init__(self, shape: ModelShape, logical_per_slot: Sequence[int]) -> None:
        self.logical = list(logical_per_slot)
        self.layers = [[ExpertMLP(shape, layer, j) for j in self.logical]
                       for layer in range(shape.layers)]

    def run(self, layer: int, recv_x: torch.Tensor, recv_count: torch.Tensor) -> torch.Tensor:
        """EP dispatch output [L, R*N, hidden] -> expert outputs of the same shape; rows past
        each slot's count are never read by combine, so they are left as they are."""
        out = torch.empty_like(recv_x)
        for i, expert in enumerate(self.layers[layer]):
            n = int(recv_count[i])
            if n:
                out[i, :n] = expert(recv_x[i, :n])
        return out


class ReferenceModel:
    """The whole model in one process, no EP and no placement: what outputs must equal."""

    def __init__(self, shape: ModelShape) -> None:
        self.shape = shape
        self.gates = [Gate(shape, layer) for layer in range(shape.layers)]
        self.experts = [[ExpertMLP(shape, layer, j) for j in range(shape.num_experts)]
                        for layer in range(shape.layers)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = request_inputs(self.shape, ids)
        for gate, experts in zip(self.gates, self.experts, strict=True):
            picks, weights = gate(h)
            moe = torch.zeros_like(h)
            for j, expert in enumerate(experts):
                rows, col = (picks == j).nonzero(as_tuple=True)
                if rows.numel():
                    moe.index_add_(0, rows, weights[rows, col].unsqueeze(1) * expert(h[rows]))
            h = h + moe
        return h
