"""From the events one demo run printed to the numbers it reports (pure: events in, dict out),
plus the timelines: ASCII always, PNG when matplotlib (the `demo` extra) is installed.

Phases are cut at the SIGKILL and at the replacement becoming active: "before", "during"
(one rank short, the replacement starting and warming up) and "after". Throughput is requests
(one token each) whose step was committed inside a phase, divided by the phase's length.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Event = dict[str, Any]
BIN = 0.2  # seconds per throughput bin in the timelines
SMOOTH = 5  # bins in the PNG's moving average


def _first(events: Iterable[Event], kind: str) -> Event | None:
    return next((e for e in events if e["ev"] == kind), None)


def committed_steps(events: Sequence[Event]) -> dict[int, list[Event]]:
    """step -> the committed step events of every rank that served it."""
    steps: dict[int, list[Event]] = {}
    for e in events:
        if e["ev"] == "step" and e["committed"]:
            steps.setdefault(e["step"], []).append(e)
    return steps


def step_ends(events: Sequence[Event]) -> list[tuple[float, int, int]]:
    """(time the step was done on every rank, step, requests) per committed step."""
    return sorted((max(e["t1"] for e in evs), step, sum(e["end"] - e["begin"] for e in evs))
                  for step, evs in committed_steps(events).items())


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def analyse(events: Sequence[Event], settings: dict[str, Any]) -> dict[str, Any]:
    """The report of one run (times in ms, throughput in requests/s)."""
    batch = settings["ranks"] * settings["tokens"]
    kill_rank = settings["kill_rank"]
    ends = step_ends(events)
    if not ends:
        raise ValueError("the run committed no step: nothing to report")
    t_start = min(e["t0"] for e in events if e["ev"] == "step")
    t_end = ends[-1][0]
    kill = _first(events, "kill")
    active = _first(events, "active")
    t_kill = kill["t"] if kill else None
    t_join = active["t"] if active else None

    seen = [e["seen_t"] for e in events if e["ev"] == "failure_seen" and e["rank"] != kill_rank
            and t_kill is not None and e["seen_t"] >= t_kill]
    detect = min(seen) - t_kill if seen and t_kill is not None else None
    after_kill = [t for t, step, _ in ends if t_kill is not None and t > t_kill
                  and (kill is None or step >= kill["step"])]
    resume = min(after_kill) - t_kill if after_kill and t_kill is not None else None

    stalls = [e["stall"] for e in events if e["ev"] == "admitted"]
    recovery = [e["waited"] for e in events if e["ev"] == "recovery_done"]
    start = next((e for e in events if e["ev"] == "start" and e.get("replacement")), None)
    warm0, warm1 = _first(events, "warmup_start"), _first(events, "warmup_end")
    replacement: dict[str, Any] = {}
    if active:
        replacement = {
            "start_to_active_ms": _ms(active["t"] - active["started"]),
            "start_to_warmup_ms": _ms(warm0["t"] - active["started"]) if warm0 else None,
            "warmup_ms": _ms(warm1["t"] - warm0["t"]) if warm0 and warm1 else None,
            "warmup_passes": warm1["passes"] if warm1 else None,
            "join_call_to_active_ms": _ms(active["t"] - active["join_called"]),
            "isolated_during_warmup": bool(warm0 and warm0["isolated"]),
        }
    if start and t_kill is not None:
        replacement["kill_to_process_start_ms"] = _ms(start["started"] - t_kill)
        replacement["python_and_torch_import_ms"] = _ms(start["imported"] - start["started"])

    def rate(lo: float | None, hi: float | None) -> float | None:
        if lo is None or hi is None or hi <= lo:
            return None
        return round(sum(n for t, _, n in ends if lo < t <= hi) / (hi - lo), 1)

    phases = {"before": (t_start, t_kill if t_kill else t_end),
              "during": (t_kill, t_join), "after": (t_join, t_end)}
    throughput = {name: rate(lo, hi) for name, (lo, hi) in phases.items()}

    # the longest time between two committed steps once the survivors resumed: the pause
    # the users saw (in sync mode the recovery phase; in deferred mode a step or an admission)
    gaps = [(b[0] - a[0]) for a, b in zip(ends, ends[1:], strict=False)
            if resume is not None and t_kill is not None and a[0] >= t_kill + resume]
    normal = [(b[0] - a[0]) for a, b in zip(ends, ends[1:], strict=False)
              if t_kill is None or b[0] < t_kill]

    # time nobody was served: gaps of more than 3 normal steps after the kill, less one step;
    # with requests arriving at the before-rate (an open-loop load, which this closed-loop
    # demo does not have) that many would have waited
    step_s = statistics.median(normal) if normal else 0.0
    idle = sum(g - step_s for a, b in zip(ends, ends[1:], strict=False)
               if t_kill is not None and b[0] > t_kill and (g := b[0] - a[0]) > 3 * step_s)
    waiting = round(idle * throughput["before"]) if throughput["before"] else None

    served: dict[int, int] = {}
    for _, evs in committed_steps(events).items():
        for e in evs:
            for i in range(e["begin"], e["end"]):
                served[i] = served.get(i, 0) + 1
    last = max(committed_steps(events))
    expected = (last + 1) * batch
    redone = {e["step"] for e in events if e["ev"] == "step" and not e["committed"]}
    checks = [(e["t1"], e["err"]) for e in events if e["ev"] == "step" and e["err"] is not None]

    def checks_in(lo: float | None, hi: float | None) -> dict[str, Any]:
        errs = [err for t, err in checks
                if (lo is None or t > lo) and (hi is None or t <= hi)]
        return {"checked": len(errs), "max_rel_err": max(errs) if errs else None,
                "ok": all(err <= settings["tolerance"] for err in errs)}

    def load(lo: float | None, hi: float | None) -> list[float | None]:
        """Mean rows each rank's experts received per committed step inside (lo, hi]."""
        if lo is None or hi is None:
            return [None] * settings["ranks"]
        per: list[list[int]] = [[] for _ in range(settings["ranks"])]
        for evs in committed_steps(events).values():
            for e in evs:
                if lo < e["t1"] <= hi:
                    per[e["rank"]].append(e["received"])
        return [round(statistics.mean(v), 1) if v else None for v in per]

    return {
        "join_mode": settings["join_mode"],
        "steps": last + 1,
        "seconds": round(t_end - t_start, 3),
        "detection_ms": _ms(detect),
        "survivors_resume_ms": _ms(resume),
        "admission_stall_ms": _ms(max(stalls)) if stalls else None,
        "admission_stall_median_ms": _ms(statistics.median(stalls)) if stalls else None,
        "recovery_phase_ms": _ms(max(recovery)) if recovery else None,
        "longest_gap_after_resume_ms": _ms(max(gaps)) if gaps else None,
        "median_step_before_ms": _ms(statistics.median(normal)) if normal else None,
        "replacement": replacement,
        "throughput_rps": throughput,
        "requests": {
            "total": expected,
            "served": sum(1 for i in range(expected) if served.get(i)),
            "dropped": sum(1 for i in range(expected) if not served.get(i)),
            "served_twice": sum(1 for n in served.values() if n > 1),
            "delayed": len(redone) * batch,
            "steps_redone": sorted(redone),
            "open_loop_delayed_estimate": waiting,
        },
        "idle_after_kill_ms": _ms(idle),
        "reference_check": {name: checks_in(lo, hi) for name, (lo, hi) in phases.items()},
        "expert_rows_per_rank": {name: load(lo, hi) for name, (lo, hi) in phases.items()},
        "timeline": {
            "t0": t_start,
            "kill_s": None if t_kill is None else round(t_kill - t_start, 3),
            "detected_s": None if detect is None or t_kill is None
            else round(t_kill + detect - t_start, 3),
            "join_s": None if t_join is None else round(t_join - t_start, 3),
            "warmup_s": None if not (warm0 and warm1)
            else [round(warm0["t"] - t_start, 3), round(warm1["t"] - t_start, 3)],
            "bins": throughput_bins(ends, t_start),
        },
    }


def throughput_bins(ends: Sequence[tuple[float, int, int]], t_start: float) -> list[float]:
    """Requests per second in consecutive BIN-second bins from t_start."""
    if not ends:
        return []
    n = int((ends[-1][0] - t_start) / BIN) + 1
    bins = [0.0] * n
    for t, _, requests in ends:
        bins[min(int((t - t_start) / BIN), n - 1)] += requests / BIN
    return [round(b, 1) for b in bins]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def all_checks_ok(report: dict[str, Any]) -> bool:
    return all(p["ok"] for p in report["reference_check"].values())


# ---- text ------------------------------------------------------------------------------------

def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _loads(values: Sequence[float | None]) -> str:
    return " ".join("-" if v is None else f"{v:.0f}" for v in values)


REPORT_ROWS = [
    ("failure detected after", lambda r: _fmt(r["detection_ms"], " ms")),
    ("survivors serving again after", lambda r: _fmt(r["survivors_resume_ms"], " ms")),
    ("healthy ranks' stall to admit the joiner", lambda r: _fmt(r["admission_stall_ms"], " ms")),
    ("serving paused for the recovery phase", lambda r: _fmt(r["recovery_phase_ms"], " ms")),
    ("longest gap between steps once serving again",
     lambda r: _fmt(r["longest_gap_after_resume_ms"], " ms")),
    ("a normal step (median, before the kill)",
     lambda r: _fmt(r["median_step_before_ms"], " ms")),
    ("replacement: process start -> active",
     lambda r: _fmt(r["replacement"].get("start_to_active_ms"), " ms")),
    ("replacement: SIGKILL -> its process started",
     lambda r: _fmt(r["replacement"].get("kill_to_process_start_ms"), " ms")),
    ("replacement: python + import torch, elasticpg",
     lambda r: _fmt(r["replacement"].get("python_and_torch_import_ms"), " ms")),
    ("replacement: warm-up (isolated)", lambda r: _fmt(r["replacement"].get("warmup_ms"), " ms")),
    ("replacement: join_group -> active",
     lambda r: _fmt(r["replacement"].get("join_call_to_active_ms"), " ms")),
    ("throughput before (requests/s)", lambda r: _fmt(r["throughput_rps"]["before"])),
    ("throughput during (requests/s)", lambda r: _fmt(r["throughput_rps"]["during"])),
    ("throughput after (requests/s)", lambda r: _fmt(r["throughput_rps"]["after"])),
    ("requests served / total", lambda r: f"{r['requests']['served']} / {r['requests']['total']}"),
    ("requests dropped", lambda r: _fmt(r["requests"]["dropped"])),
    ("requests delayed (step served again)", lambda r: _fmt(r["requests"]["delayed"])),
    ("time nobody was served after the kill", lambda r: _fmt(r["idle_after_kill_ms"], " ms")),
    ("... requests arriving at the before-rate in it",
     lambda r: _fmt(r["requests"]["open_loop_delayed_estimate"])),
    ("rows to each rank's experts per step, before",
     lambda r: _loads(r["expert_rows_per_rank"]["before"])),
    ("... during (replicas take the dead rank's)",
     lambda r: _loads(r["expert_rows_per_rank"]["during"])),
    ("... after (re-balanced)", lambda r: _loads(r["expert_rows_per_rank"]["after"])),
    ("outputs = reference (checks before/during/after)",
     lambda r: ("yes" if all_checks_ok(r) else "NO") + " ("
     + "/".join(str(r["reference_check"][p]["checked"]) for p in ("before", "during", "after"))
     + ")"),
]


def render(reports: Sequence[dict[str, Any]]) -> str:
    """The reports side by side, one column per join mode."""
    width = max(len(name) for name, _ in REPORT_ROWS)
    cols = [[cell(r) for _, cell in REPORT_ROWS] for r in reports]
    heads = [r["join_mode"] + " join" for r in reports]
    cw = [max(len(h), *(len(c) for c in col)) for h, col in zip(heads, cols, strict=True)]
    lines = [f"{'':<{width}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, cw, strict=True))]
    for i, (name, _) in enumerate(REPORT_ROWS):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{col[i]:>{w}}"
                                                     for col, w in zip(cols, cw, strict=True)))
    return "\n".join(lines)


def ascii_timeline(report: dict[str, Any], width: int = 72, height: int = 6) -> str:
    """Throughput per BIN as a bar chart; K marks the SIGKILL, W the warm-up, J the join."""
    tl = report["timeline"]
    bins = tl["bins"]
    if not bins:
        return "(no steps)"
    per = max(1, -(-len(bins) // width))  # bins per column
    cols = [sum(bins[i:i + per]) / len(bins[i:i + per]) for i in range(0, len(bins), per)]
    top = max(cols) or 1.0
    rows = []
    for level in range(height, 0, -1):
        rows.append("|" + "".join("#" if c >= top * (level - 0.5) / height else " "
                                  for c in cols))
    marks = [" "] * len(cols)

    def mark(at: float | None, ch: str) -> None:
        if at is not None:
            i = min(int(at / BIN) // per, len(cols) - 1)
            marks[i] = ch

    if tl["warmup_s"]:
        lo, hi = tl["warmup_s"]
        for i in range(min(int(lo / BIN) // per, len(cols) - 1),
                       min(int(hi / BIN) // per, len(cols) - 1) + 1):
            marks[i] = "w"
    mark(tl["kill_s"], "K")
    mark(tl["join_s"], "J")
    seconds = len(bins) * BIN
    return (f"{report['join_mode']} join: requests/s per {BIN:g} s (peak {top:,.0f}), "
            f"{seconds:.1f} s\n" + "\n".join(rows) + "\n+" + "".join(marks)
            + "\n K = rank killed, w = replacement warming up, J = replacement active")


def write_png(reports: Sequence[dict[str, Any]], path: str) -> bool:
    """The timelines as a PNG, one panel per mode; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(reports), 1, figsize=(10, 2.8 * len(reports)), sharex=True,
                             squeeze=False)
    for ax, r in zip(axes[:, 0], reports, strict=True):
        tl = r["timeline"]
        xs = [i * BIN for i in range(len(tl["bins"]))]
        ax.step(xs, tl["bins"], where="post", color="tab:blue", alpha=0.3,
                label=f"requests/s per {BIN:g} s")
        ax.plot(xs, smooth(tl["bins"], SMOOTH), color="tab:blue",
                label=f"requests/s, {SMOOTH * BIN:g} s average")
        if tl["warmup_s"]:
            ax.axvspan(*tl["warmup_s"], color="tab:orange", alpha=0.2,
                       label="replacement warming up (isolated)")
        if tl["kill_s"] is not None:
            ax.axvline(tl["kill_s"], color="tab:red", label="SIGKILL")
        if tl["join_s"] is not None:
            ax.axvline(tl["join_s"], color="tab:green", label="replacement active")
        paused = r["recovery_phase_ms"] or r["admission_stall_ms"]
        ax.set_title(f"{r['join_mode']} join: failure detected in "
                     f"{_fmt(r['detection_ms'], ' ms')}; healthy ranks paused "
                     f"{_fmt(paused, ' ms')} for the join")
        ax.set_ylabel("requests/s")
        ax.legend(loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
