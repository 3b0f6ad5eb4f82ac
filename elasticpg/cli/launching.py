"""What every benchmark command (and the test harness) needs to start rank processes and read
its command line: one copy, so that the tools cannot drift apart.

* starting ranks: `listen_store` (the parent's rendezvous store), `die_with_parent` (inside a
  spawned rank; `die_with_parent_hook` for a child started by subprocess),
  `reset_torch_distributed` (between two jobs run by the same rank process), `cpu_count` and
  `oversubscription_note` (how many ranks the machine can run without them fighting for
  cores);
* reading and recording the arguments: `comma_choices` (an argparse type for lists like
  ``--ops all_reduce,barrier``), `check_output_dirs`, `command_line` and `host_meta` (what a
  report says about the run).

Everything listens on 127.0.0.1 (`HOST`) only.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

HOST = "127.0.0.1"


# ---- starting rank processes ------------------------------------------------------------------

def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total): ranks are
    sized to it."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def oversubscription_note(ranks: int, cpus: int) -> str:
    """A banner suffix warning that the timings are noisy when there are more ranks than CPUs."""
    if ranks > cpus:
        return f"; NOTE {ranks} ranks on {cpus} CPUs: oversubscribed, timings are noisy"
    return ""


def listen_store(world: int, timeout: float, host: str = HOST,
                 port: int = 0) -> tuple[Any, int]:
    """A TCPStore master in this process, listening on `host` (127.0.0.1) at `port` (0: a
    kernel-chosen one).

    Returns (store, port). The socket is bound before the store exists, so there is no window
    in which another process can take the port; the store outlives any rank's death.
    """
    from datetime import timedelta

    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server's port
    sock.bind((host, port))
    sock.listen(256)
    port = sock.getsockname()[1]
    td = timedelta(seconds=timeout)
    try:
        store = dist.TCPStore(host, port, world, True, td, wait_for_workers=False,
                              master_listen_fd=sock.fileno())
        sock.detach()  # the store owns the listening socket now
    except TypeError:  # an older torch without master_listen_fd: re-bind the same port
        sock.close()
        store = dist.TCPStore(host, port, world, True, td, wait_for_workers=False)
    return store, port


def _pdeathsig() -> Callable[[], object] | None:
    """libc's prctl(PR_SET_PDEATHSIG, SIGKILL) for the calling process, ready to call; None
    where there is no such call (not Linux)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL, 0, 0, 0)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, even while it is stopped (a
    SIGSTOPped rank cannot notice by itself). Elsewhere a getppid check must do."""
    set_pdeathsig = _pdeathsig()
    if set_pdeathsig is not None:
        set_pdeathsig()


def die_with_parent_hook() -> Callable[[], None]:
    """`die_with_parent` as a `subprocess.Popen(preexec_fn=...)`, for a parent that may run
    threads: libc is looked up here, in the parent, so that the forked child makes only the
    prctl call before exec (a child forked from a threaded process must not dlopen). The child
    also exits at once if its parent died before the call (nobody would be left to kill it)."""
    set_pdeathsig = _pdeathsig()
    parent = os.getpid()

    def hook() -> None:
        if set_pdeathsig is not None:
            set_pdeathsig()
        if os.getppid() != parent:
            os._exit(1)

    return hook


def reset_torch_distributed() -> None:
    """After a job in a reused rank process: destroy whatever default group is left, and reset
    torch's group counter, which a failed init_process_group leaves bumped; otherwise this
    process would give its groups other names (store prefixes) than its peers in the next job.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - a job that broke its group: reset anyway
            logging.getLogger("elasticpg.cli").info("destroying the last job's groups: %s", exc)
    try:
        dist.distributed_c10d._world.group_count = 0
    except AttributeError:
        pass


# ---- reading and recording the arguments ------------------------------------------------------

def comma_choices(choices: Sequence[str], noun: str, aliases: Mapping[str, str] | None = None,
                  allow_all: bool = False) -> Callable[[str], list[str]]:
    """An argparse `type` for a comma-separated list of `choices` (like ``a,b-c,a``).

    Names are matched case-insensitively with '-' read as '_', after `aliases`; duplicates are
    dropped, order is kept. With allow_all, 'all' means every choice. Anything else is an
    argparse error that names the unknown `noun` and the choices.
    """
    aliases = aliases or {}
    hint = " (or 'all')" if allow_all else ""

    def parse(text: str) -> list[str]:
        if allow_all and text.strip().lower() == "all":
            return list(choices)
        out: list[str] = []
        for part in text.split(","):
            name = part.strip().lower().replace("-", "_")
            if not name:
                continue
            name = aliases.get(name, name)
            if name not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown {noun} {part.strip()!r}; choose from {', '.join(choices)}{hint}")
            if name not in out:
                out.append(name)
        if not out:
            raise argparse.ArgumentTypeError(f"no {noun}s given")
        return out

    return parse


def check_output_dirs(parser: argparse.ArgumentParser, *paths: str | None) -> None:
    """Fail at parse time, not after minutes of measuring, when an output file's directory
    does not exist. None (the option was not given) is skipped."""
    for path in paths:
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                parser.error(f"directory {parent} does not exist (for {path})")


def command_line(prog: str, module: str, argv: list[str] | None) -> str:
    """The command as the user typed it, for reports: `prog` and the arguments, or
    ``python -m module ...`` when run that way (argv None means sys.argv)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is None and os.path.basename(sys.argv[0]).endswith(".py"):
        prog = f"python -m {module}"
    return " ".join([prog, shlex.join(args)]).strip()


def host_meta(cpus: int) -> dict[str, Any]:
    """What a report records about where it ran: torch and Python versions, UTC date, OS and
    machine, CPUs."""
    import torch

    return {
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": f"{platform.system()} {platform.machine()}", "cpus": cpus,
    }
