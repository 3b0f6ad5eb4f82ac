"""Structured events: what a group saw, decided and applied, and why.

Every event is one record on the logger ``elasticpg.events`` (INFO; WARNING for failures and
mismatches) whose message reads well as text and whose fields are in ``record.elasticpg``, a
dict with at least ``event``, ``group`` and ``rank``. `JsonLinesFormatter` writes one JSON
object per line. Nothing is configured unless asked: call `log_events()`, or set
``ELASTICPG_LOG=json`` (or ``text``) in the environment before importing elasticpg.

Every event of a group also carries ``epoch`` (of the view applied when it happened); ``rank``
is the rank that observed, decided or did it. Events: peer_failed (peer, member, reason, how:
eof / bad_frame / silence / send / send_timeout / stopped_reading / connect / left),
op_timeout (op, seq, ranks), view_decided (epoch, active, removed, added, cause: emitted by the
rank whose proposal won), view_applied (epoch, active, cause: at every rank), joiner_ready /
joiner_gone (member side), join_started / join_admitted / join_abandoned (joiner side),
ranks_activated, ranks_deactivated, mismatch (seq, reported_by, reason), connection_rejected
(remote, reason: a data-plane connection that did not prove membership), metrics_endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, TextIO

log = logging.getLogger("elasticpg.events")


def emit(kind: str, group: str, rank: int, level: int = logging.INFO, **fields: Any) -> None:
    if not log.isEnabledFor(level):
        return
    data = {"event": kind, "group": group, "rank": rank, **fields}
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    log.log(level, "%s group=%s rank=%s %s", kind, group, rank, text, extra={"elasticpg": data})


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data = getattr(record, "elasticpg", None) or {"message": record.getMessage()}
        out = {"time": round(record.created, 6), "level": record.levelname,
               "logger": record.name, **data}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_events(stream: TextIO | None = None, json_lines: bool = True,
               level: int = logging.INFO) -> logging.Handler:
    """Send elasticpg's records (events and diagnostics) to `stream` (default stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("elasticpg")
    root.addHandler(handler)
    root.setLevel(min(root.level or level, level))
    return handler


def configure_from_env() -> None:
    """$ELASTICPG_LOG=json|text: turn the event log on without changing code."""
    mode = os.environ.get("ELASTICPG_LOG", "").strip().lower()
    if not mode:
        return
    if mode not in ("json", "text"):
        raise ValueError(f"ELASTICPG_LOG must be 'json' or 'text', got {mode!r}")
    log_events(json_lines=mode == "json")
