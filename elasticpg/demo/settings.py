"""`elasticpg demo`'s settings: one frozen record, checked before any process starts (pure).

Every impossible combination is refused here with a message that names the option, so a bad
command line never gets as far as four ranks waiting on each other.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from .model import ModelShape
from .placement import Placement, PlacementError

JOIN_MODES = ("deferred", "sync")


class SettingsError(ValueError):
    """A demo setting that cannot work; the message says which option and why."""


@dataclass(frozen=True)
class DemoSettings:
    ranks: int = 4
    steps: int = 240  # serving steps, at least; see after_steps
    kill_step: int = 60  # the step during which kill_rank is SIGKILLed
    kill_rank: int = 1
    warmup: float = 4.0  # seconds the replacement warms up (forward passes) before joining
    after_steps: int = 40  # the run goes on until this many steps were served at full strength
    join_mode: str = "deferred"
    tokens: int = 16  # requests per rank per step at full strength (one token each)
    hidden: int = 128
    ffn: int = 256
    experts: int = 8  # logical experts per layer
    replicas: int = 2
    top_k: int = 2
    layers: int = 4
    check_every: int = 10  # compare with the single-process reference every this many steps
    tolerance: float = 1e-4  # max |served - reference|, relative to the reference's max |x|
    timeout: float = 180.0  # bound on the whole run, seconds
    op_timeout: float = 30.0  # bound on one collective or EP exchange, seconds
    seed: int = 1234

    # ---- derived ------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """Requests served per step by all ranks together (the dead rank's share included)."""
        return self.ranks * self.tokens

    @property
    def max_tokens_per_rank(self) -> int:
        """N of the EP layer: a rank's share when one rank is missing."""
        return math.ceil(self.batch / max(self.ranks - 1, 1))

    def shape(self) -> ModelShape:
        return ModelShape(self.hidden, self.ffn, self.experts, self.top_k, self.layers,
                          self.seed)

    def placement(self) -> Placement:
        return Placement(self.ranks, self.experts, self.replicas)

    # ---- (de)serialisation: the workers get the settings on their command line ---------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DemoSettings:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown demo setting(s) {unknown}")
        return validate(cls(**data))


def validate(s: DemoSettings) -> DemoSettings:
    """`s` if it can run, else SettingsError naming the option (checked in a fixed order)."""
    if s.ranks < 2:
        raise SettingsError(f"--ranks {s.ranks}: the demo kills one rank and needs at least "
                            f"one more to keep serving")
    if not 0 <= s.kill_rank < s.ranks:
        raise SettingsError(f"--kill-rank {s.kill_rank} is not a rank of the run "
                            f"(0..{s.ranks - 1})")
    if s.steps < 2:
        raise SettingsError(f"--steps {s.steps}: need at least 2 steps (one before the kill)")
    if not 1 <= s.kill_step < s.steps:
        raise SettingsError(f"--kill-step {s.kill_step} is beyond the run: it must be in "
                            f"1..{s.steps - 1} (--steps {s.steps})")
    if s.after_steps < 1:
        raise SettingsError(f"--after-steps {s.after_steps}: at least one step must be "
                            f"served after the join")
    for name in ("warmup", "timeout", "op_timeout", "tolerance"):
        value = getattr(s, name)
        if not (value >= 0 and math.isfinite(value)):
            raise SettingsError(f"--{name.replace('_', '-')} must be a finite number >= 0, "
                                f"got {value}")
    if s.timeout <= 0 or s.op_timeout <= 0:
        raise SettingsError("--timeout and --op-timeout must be more than 0 seconds")
    if s.warmup >= s.timeout:
        raise SettingsError(f"--warmup {s.warmup:g} s is longer than the whole run may take "
                            f"(--timeout {s.timeout:g} s): the replacement could never join")
    if s.join_mode not in JOIN_MODES:
        raise SettingsError(f"--join-mode {s.join_mode!r}: expected one of {JOIN_MODES}")
    for name in ("tokens", "hidden", "ffn", "experts", "replicas", "top_k", "layers",
                 "check_every"):
        if getattr(s, name) < 1:
            raise SettingsError(f"--{name.replace('_', '-')} must be at least 1, "
                                f"got {getattr(s, name)}")
    if s.replicas < 2:
        raise SettingsError(f"--replicas {s.replicas}: every expert needs a copy on another "
                            f"rank, or the killed rank's experts would be lost")
    if s.ranks > s.experts * s.replicas:
        raise SettingsError(f"more ranks ({s.ranks}) than expert slots ({s.experts} experts "
                            f"x {s.replicas} replicas): some rank would host no expert")
    if s.top_k > s.experts:
        raise SettingsError(f"--top-k {s.top_k} is more than --experts {s.experts}")
    try:
        s.placement()
    except PlacementError as exc:
        raise SettingsError(f"--experts/--replicas/--ranks: {exc}") from None
    return s
