"""`elasticpg demo`, short, with real processes: 4 ranks under `elasticpg run`, a real SIGKILL,
a replacement that warms up isolated and joins; both join modes side by side; Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elasticpg.cli.main import main

ROOT = Path(__file__).resolve().parent.parent.parent
WARMUP = 2.0
SHORT = ["--steps", "24", "--kill-step", "6", "--after-steps", "6", "--warmup", str(WARMUP),
         "--tokens", "8", "--hidden", "64", "--ffn", "64", "--layers", "3", "--check-every",
         "4", "--timeout", "120", "--plain"]


def demo(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elasticpg.cli.main", "demo", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped by its parent is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_demo_both_modes_outputs_equal_reference_and_deferred_never_pauses(tmp_path):
    done = demo(*SHORT, "--compare", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {r["join_mode"]: r for r in json.loads((tmp_path / "report.json").read_text())["runs"]}
    for mode, r in runs.items():
        # the outputs equal the single-process reference before, during and after the failure
        checks = r["reference_check"]
        assert all(checks[p]["ok"] for p in checks), (mode, checks)
        assert checks["before"]["checked"] and checks["after"]["checked"], (mode, checks)
        assert r["requests"]["dropped"] == 0 and r["requests"]["served_twice"] == 0, mode
        assert r["requests"]["steps_redone"] == [6], mode  # the step the rank died in
        assert r["detection_ms"] is not None and r["replacement"]["start_to_active_ms"], mode
        assert r["replacement"]["isolated_during_warmup"], mode
        # re-balanced: after the join every rank's experts get rows again
        assert None not in r["expert_rows_per_rank"]["after"], (mode, r["expert_rows_per_rank"])
    deferred, sync = runs["deferred"], runs["sync"]
    # deferred: the survivors served (and were checked) while the replacement warmed up, and
    # never paused for anything like the warm-up: the longest gap is steps and the admission
    assert deferred["reference_check"]["during"]["checked"] > 0
    assert deferred["throughput_rps"]["during"] > 0
    rows = deferred["expert_rows_per_rank"]["during"]  # the dead rank's share went to replicas
    assert rows[1] is None and all(rows[r] for r in (0, 2, 3)), rows
    assert deferred["admission_stall_ms"] is not None
    assert deferred["longest_gap_after_resume_ms"] < WARMUP * 1e3 / 2, deferred
    # sync: the healthy ranks waited at least the whole warm-up in the recovery phase
    assert sync["recovery_phase_ms"] >= WARMUP * 1e3, sync
    assert sync["throughput_rps"]["during"] == 0.0
    assert "deferred join" in done.stdout and "sync join" in done.stdout
    assert "K = rank killed" in done.stdout  # the ASCII timeline


@pytest.mark.parametrize("args, words", [
    (["--kill-step", "500"], "beyond the run"),
    (["--warmup", "300", "--timeout", "100"], "longer than the whole run"),
    (["--experts", "7"], "do not divide"),
    (["--ranks", "20"], "more ranks"),
])
def test_impossible_settings_are_refused_before_anything_starts(args, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *args, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def _sigint_ignored() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_ctrl_c_leaves_no_process_behind(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "elasticpg.cli.main", "demo", *SHORT,
                             "--warmup", "30", "--out", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # as a background job of a non-interactive shell starts it (CI may)
                            preexec_fn=_sigint_ignored)
    try:
        lines = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # until the replacement is warming up: every kind is running
            lines.append(line)
            if "warming up" in line or time.monotonic() > deadline:
                break
        assert any("warming up" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(lines) + rest
    events = [json.loads(line.split("@demo ", 1)[1])
              for line in (tmp_path / "deferred.log").read_text().splitlines()
              if "@demo " in line]
    pids = {e["pid"] for e in events if e["ev"] == "start"}
    assert len(pids) == 5  # 4 ranks and the replacement
    # the launcher killed and reaped every worker before it exited, and the demo waited for it
    assert not [p for p in pids if alive(p)]
