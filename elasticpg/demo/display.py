"""The live view of a demo run: what each step served and what is happening to the group.

`Progress` turns the workers' events into the state shown (pure). Two views draw it: `rich`
(the `demo` extra) when stdout is a terminal, else plain lines (one per state change, and a
status line every PLAIN_EVERY seconds) that read well in a log or CI.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

PLAIN_EVERY = 1.0  # seconds between two plain status lines
RATE_WINDOW = 1.0  # seconds of committed steps the live throughput is averaged over


@dataclass
class Progress:
    mode: str
    ranks: int
    steps: int
    kill_rank: int
    step: int = 0
    mask: list[int] = field(default_factory=list)
    epoch: int = 0
    what: str = "starting"
    t0: float | None = None
    warmup_from: float | None = None
    recent: deque = field(default_factory=deque)  # (time, requests) of committed steps
    news: list[str] = field(default_factory=list)  # state changes not shown yet
    checks: int = 0
    bad_checks: int = 0
    served: int = 0
    _seen: set = field(default_factory=set)

    def rate(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1][0] - self.recent[0][0]
        return sum(n for _, n in list(self.recent)[1:]) / span if span > 0 else 0.0

    def elapsed(self, now: float) -> float:
        return 0.0 if self.t0 is None else now - self.t0

    def _say(self, text: str, now: float) -> None:
        self.what = text
        self.news.append(f"[{self.elapsed(now):6.2f}s] {text}")

    def feed(self, e: dict[str, Any], tolerance: float) -> None:
        kind, now = e["ev"], e["t"]
        if kind == "step":
            if self.t0 is None:
                self.t0 = e["t0"]
            if e["err"] is not None:
                self.checks += 1
                self.bad_checks += e["err"] > tolerance
            if not e["committed"]:
                if ("redo", e["step"]) not in self._seen:
                    self._seen.add(("redo", e["step"]))
                    self._say(f"step {e['step']} is served again over the survivors "
                              f"(a peer failed inside it)", now)
                return
            self.served += e["end"] - e["begin"]
            key = ("step", e["step"])
            if key in self._seen:
                self.recent[-1] = (self.recent[-1][0], self.recent[-1][1] + e["end"] - e["begin"])
                return
            self._seen.add(key)
            self.step, self.mask, self.epoch = e["step"], e["mask"], e["epoch"]
            self.recent.append((e["t1"], e["end"] - e["begin"]))
            while self.recent and self.recent[0][0] < e["t1"] - RATE_WINDOW:
                self.recent.popleft()
            if self.what in ("starting", "replacement active: serving on all ranks again"):
                self.what = "serving"
        elif kind == "kill":
            self._say(f"rank {e['rank']} SIGKILLed inside step {e['step']} (layer "
                      f"{e['layer']}, between dispatch and combine)", now)
        elif kind == "failure_seen" and ("seen", e["step"]) not in self._seen:
            self._seen.add(("seen", e["step"]))
            self._say(f"rank {e['rank']} saw the failure in its {e['where']}; survivors "
                      f"serve on {sum(e['mask'])} ranks", now)
        elif kind == "start" and e.get("replacement"):
            self._say(f"launcher started a replacement for rank {e['rank']} (pid {e['pid']})",
                      now)
        elif kind == "warmup_start":
            self.warmup_from = now
            self._say(f"replacement warming up in isolation (its all_reduce is local: "
                      f"{e['isolated']})", now)
        elif kind == "warmup_end":
            self._say(f"replacement warmed up ({e['passes']} forward passes); join_group", now)
        elif kind == "recovery_phase" and ("recovery", e["step"]) not in self._seen:
            self._seen.add(("recovery", e["step"]))
            self._say("sync mode: healthy ranks stop serving and wait for the replacement",
                      now)
        elif kind == "admitted" and ("admitted", e["step"]) not in self._seen:
            self._seen.add(("admitted", e["step"]))
            self._say(f"rank(s) {e['ranks']} admitted at step {e['step']}, epoch "
                      f"{e['epoch']}: healthy ranks stalled {e['stall'] * 1e3:.1f} ms", now)
        elif kind == "active":
            self._say("replacement active: serving on all ranks again", now)

    def status(self, now: float) -> str:
        mask = "".join("#" if a else "." for a in self.mask) or "-"
        return (f"[{self.elapsed(now):6.2f}s] {self.mode:8s} step {self.step:4d}"
                f"  {self.rate():8,.0f} req/s  ranks {mask}  epoch {self.epoch:2d}  "
                f"checks {self.checks - self.bad_checks}/{self.checks} ok  {self.what}")


class PlainView:
    def __init__(self, progress: Progress, out: TextIO = sys.stdout) -> None:
        self.p, self.out, self.last, self.shown = progress, out, 0.0, ""

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.update(force=True)

    def update(self, force: bool = False) -> None:
        now = time.time()
        for line in self.p.news:
            print(line, file=self.out, flush=True)
        self.p.news.clear()
        if (force or now - self.last >= PLAIN_EVERY) and self.p.t0 is not None:
            self.last = now
            line = self.p.status(now)
            if line.split("] ", 1)[1] != self.shown:  # only when something moved
                self.shown = line.split("] ", 1)[1]
                print(line, file=self.out, flush=True)


class RichView:
    """A live panel: the status line above, the state changes so far below."""

    def __init__(self, progress: Progress) -> None:
        from rich.console import Console
        from rich.live import Live

        self.p = progress
        self.console = Console()
        self.live = Live(console=self.console, refresh_per_second=8, transient=False)
        self.log: list[str] = []

    def _render(self) -> Any:
        from rich.panel import Panel
        from rich.table import Table

        t = Table.grid(padding=(0, 2))
        now = time.time()
        p = self.p
        mask = " ".join("[green]#[/]" if a else "[red]x[/]" for a in p.mask) or "-"
        t.add_row("step", str(p.step), "requests/s", f"{p.rate():,.0f}")
        t.add_row("ranks", mask, "epoch", str(p.epoch))
        t.add_row("checks", f"{p.checks - p.bad_checks}/{p.checks} equal the reference",
                  "elapsed", f"{p.elapsed(now):.1f} s")
        t.add_row("now", f"[bold]{p.what}[/]", "", "")
        body = Table.grid()
        body.add_row(t)
        for line in self.log[-8:]:
            body.add_row(f"[dim]{line}[/]")
        return Panel(body, title=f"elasticpg demo — {p.mode} join")

    def __enter__(self) -> RichView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.update()
        self.live.__exit__(None, None, None)

    def update(self, force: bool = False) -> None:
        self.log.extend(self.p.news)
        self.p.news.clear()
        self.live.update(self._render())


def make_view(progress: Progress, fancy: bool | None = None) -> PlainView | RichView:
    """rich when asked or when stdout is a terminal and rich is installed; else plain."""
    if fancy is None:
        fancy = sys.stdout.isatty()
    if fancy:
        try:
            return RichView(progress)
        except ImportError:
            pass  # the demo extra is not installed: plain lines do the same job
    return PlainView(progress)
