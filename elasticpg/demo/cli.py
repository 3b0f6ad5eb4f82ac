"""`elasticpg demo`: elastic MoE serving through a SIGKILL, an isolated warm-up and a join.

This process is the conductor only: it checks the settings, starts `elasticpg run` (which
starts the ranks and restarts the killed one as a replacement), reads the `@demo` events the
ranks print, draws the live view, and at the end writes the report (JSON), the timeline (PNG
with the `demo` extra, ASCII always) and prints both. `--compare` runs the deferred and the
sync join mode one after the other and puts them side by side.

Nothing is left behind: the launcher runs in a session of its own and dies with this process
(PR_SET_PDEATHSIG), its workers die with it the same way, Ctrl-C is forwarded to it, and
whatever still runs after a bound is SIGKILLed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ..cli.launching import cpu_count, die_with_parent_hook, oversubscription_note
from .display import Progress, make_view
from .report import all_checks_ok, analyse, ascii_timeline, render, write_png
from .settings import JOIN_MODES, DemoSettings, SettingsError, validate
from .worker import EVENT_PREFIX

LAUNCHER_GRACE = 3.0  # seconds the launcher gives workers after Ctrl-C before SIGKILL
EXIT_MARGIN = 30.0  # seconds past --timeout before the conductor ends the launcher itself


class DemoFailedError(RuntimeError):
    """The run did not finish as the demo requires (a rank failed, a check failed, ...)."""


def build_parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    p = argparse.ArgumentParser(
        prog="elasticpg demo",
        description="Serve a small mixture-of-experts model on N ranks over elasticpg.ep, "
        "SIGKILL one rank mid-step, and watch the survivors keep serving while the launcher's "
        "replacement warms up in isolation and joins (deferred join); outputs are checked "
        "against a single-process reference throughout.")
    p.add_argument("--ranks", type=int, default=d.ranks, help=f"ranks (default {d.ranks})")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"serving steps, at least (default {d.steps})")
    p.add_argument("--kill-step", type=int, default=d.kill_step,
                   help=f"the step inside which a rank is SIGKILLed (default {d.kill_step})")
    p.add_argument("--kill-rank", type=int, default=d.kill_rank,
                   help=f"the rank killed (default {d.kill_rank})")
    p.add_argument("--warmup", type=float, default=d.warmup,
                   help=f"seconds the replacement warms up before joining (default {d.warmup:g})")
    p.add_argument("--after-steps", type=int, default=d.after_steps,
                   help="steps served at full strength after the join before the run ends "
                   f"(default {d.after_steps})")
    p.add_argument("--join-mode", choices=JOIN_MODES, default=d.join_mode,
                   help="deferred: survivors serve while the replacement warms up; sync: they "
                   "wait for it in a group-wide recovery phase (default deferred)")
    p.add_argument("--compare", action="store_true",
                   help="run both join modes, one after the other, and compare them")
    for name, help_ in (("tokens", "requests per rank per step"), ("hidden", "model width"),
                        ("ffn", "expert MLP width"), ("experts", "logical experts per layer"),
                        ("replicas", "copies of each expert, each on another rank"),
                        ("top_k", "experts per token"), ("layers", "MoE layers"),
                        ("check_every", "compare with the reference every this many steps")):
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, type=int, default=getattr(d, name),
                       help=f"{help_} (default {getattr(d, name)})")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"bound on one run, seconds (default {d.timeout:g})")
    p.add_argument("--op-timeout", type=float, default=d.op_timeout,
                   help=f"bound on one collective or EP exchange (default {d.op_timeout:g} s)")
    p.add_argument("--out", default="demo-out",
                   help="folder for report.json, timeline.png and the ranks' logs "
                   "(default ./demo-out)")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--plain", action="store_true", help="plain lines, even on a terminal")
    view.add_argument("--rich", action="store_true", help="the live panel (needs rich)")
    return p


def settings_from(args: argparse.Namespace) -> DemoSettings:
    names = {f.name for f in fields(DemoSettings)}
    return validate(DemoSettings(**{k: v for k, v in vars(args).items() if k in names}))


# ---- one run ------------------------------------------------------------------------------------

def _launcher_command(s: DemoSettings) -> list[str]:
    return [sys.executable, "-m", "elasticpg.run", "--nproc-per-node", str(s.ranks),
            "--max-restarts", "1", "--restart-delay", "0", "--grace-period",
            str(LAUNCHER_GRACE), "-m", "elasticpg.demo.worker", s.to_json()]


def parse_event(line: str) -> dict[str, Any] | None:
    """The event in one line of launcher output (`[rank 1 #1] @demo {...}`), else None."""
    at = line.find(EVENT_PREFIX)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None  # a line cut by a dying process: its content never counts
    return event if isinstance(event, dict) and "ev" in event else None


class Launch:
    """`elasticpg run` with the demo's workers, in its own session, read line by line."""

    def __init__(self, s: DemoSettings, log_path: Path) -> None:
        env = {**os.environ, "ELASTICPG_FAILURE_TIMEOUT": str(s.op_timeout),
               "PYTHONUNBUFFERED": "1"}
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            _launcher_command(s), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=die_with_parent_hook())
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """Forward a stop to the launcher (it forwards to its workers); SIGKILL the launcher
        (and so, through PDEATHSIG, its workers) when it is not gone within a bound."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=LAUNCHER_GRACE + 5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop(signal.SIGTERM)
        self.reader.join(timeout=5)
        self.log.close()


def _tail(launch: Launch, log_path: Path, lines: int = 25) -> str:
    if not launch.log.closed:
        launch.log.flush()
    return "\n".join(log_path.read_text().splitlines()[-lines:])


def run_once(s: DemoSettings, out: Path, fancy: bool | None) -> list[dict[str, Any]]:
    """One run of the scenario; returns every event the ranks printed."""
    log_path = out / f"{s.join_mode}.log"
    events: list[dict[str, Any]] = []
    progress = Progress(s.join_mode, s.ranks, s.steps, s.kill_rank)
    launch = Launch(s, log_path)
    deadline = time.monotonic() + s.timeout + EXIT_MARGIN
    try:
        with make_view(progress, fancy) as view:
            while True:
                try:
                    line = launch.lines.get(timeout=0.1)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    launch.log.write(line)
                    event = parse_event(line)
                    if event is not None:
                        events.append(event)
                        progress.feed(event, s.tolerance)
                        if (event["ev"] == "start" and event["replacement"]
                                and event["rank"] != s.kill_rank):
                            launch.stop(signal.SIGTERM)
                            raise DemoFailedError(
                                f"rank {event['rank']}, which the demo does not kill, died "
                                f"and was restarted; last lines of {log_path}:\n"
                                + _tail(launch, log_path))
                view.update()
                if time.monotonic() > deadline:
                    launch.stop(signal.SIGTERM)
                    raise DemoFailedError(f"the run took longer than --timeout {s.timeout:g} s "
                                     f"(+{EXIT_MARGIN:g} s); see {log_path}")
        rc = launch.proc.wait(timeout=LAUNCHER_GRACE + 5)
    except KeyboardInterrupt:
        launch.stop(signal.SIGINT)
        raise
    finally:
        launch.close()
    done = [e for e in events if e["ev"] == "done"]
    if any(e["out_of_time"] for e in done):
        raise DemoFailedError(f"the {s.join_mode} run reached --timeout {s.timeout:g} s before "
                              f"it was back at full strength for --after-steps "
                              f"{s.after_steps}; see {log_path}")
    if rc != 0 or len(done) < s.ranks - 1:
        raise DemoFailedError(f"the {s.join_mode} run failed (launcher exit {rc}, {len(done)} "
                              f"rank(s) finished); last lines of {log_path}:\n"
                              + _tail(launch, log_path))
    return events


def run(s: DemoSettings, modes: Sequence[str], out: Path, fancy: bool | None
        ) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for mode in modes:
        ms = replace(s, join_mode=mode)
        events = run_once(ms, out, fancy)
        (out / f"{mode}.events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        reports.append(analyse(events, json.loads(ms.to_json())))
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        s = settings_from(args)
    except SettingsError as exc:
        parser.error(str(exc))
    modes = list(JOIN_MODES) if args.compare else [s.join_mode]
    out = Path(args.out)
    fancy = True if args.rich else False if args.plain else None
    print(f"elasticpg demo: {s.ranks} ranks serving a {s.layers}-layer MoE ({s.experts} "
          f"experts x {s.replicas} replicas, top-{s.top_k}, hidden {s.hidden}) over "
          f"elasticpg.ep; rank {s.kill_rank} is SIGKILLed in step {s.kill_step}; the "
          f"replacement warms up {s.warmup:g} s; join mode(s): {', '.join(modes)}"
          f"{oversubscription_note(s.ranks + 1, cpu_count())}", flush=True)
    # Ctrl-C stops the demo even when its shell started it with SIGINT ignored (a background
    # job of a non-interactive shell: Python then installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reports = run(s, modes, out, fancy)
    except DemoFailedError as exc:
        print(f"elasticpg demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elasticpg demo: interrupted; every rank was stopped", file=sys.stderr)
        return 130
    report_path = out / "report.json"
    report_path.write_text(json.dumps({"settings": json.loads(s.to_json()),
                                       "runs": reports}, indent=2))
    print()
    print(render(reports))
    print()
    for r in reports:
        print(ascii_timeline(r))
        print()
    png = out / "timeline.png"
    wrote = write_png(reports, str(png))
    print(f"report: {report_path}" + (f"; timeline: {png}" if wrote else
                                       " (pip install 'elasticpg[demo]' for a PNG timeline)"))
    ok = all(all_checks_ok(r) and r["requests"]["dropped"] == 0 for r in reports)
    if not ok:
        print("elasticpg demo: served outputs differed from the reference, or requests were "
              "dropped: see the report", file=sys.stderr)
    return 0 if ok else 1
