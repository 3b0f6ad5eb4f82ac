"""A worker for launcher tests that needs no torch (it starts in milliseconds): what matters
there is how `elasticpg run` treats processes, not what they compute.

    plain_worker.py crash RANK   rank RANK exits with status 3 at once, every time; the others
                                 wait for SIGUSR1 from the test, then exit 0
    plain_worker.py linger       rank 0 starts a grandchild that ignores SIGINT and would
                                 outlive it; rank 1 ignores SIGINT and SIGTERM (only SIGKILL
                                 ends it); both wait

Every worker first prints one line: its pid and the launcher-given environment, as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT",
        "ELASTICPG_REPLACEMENT", "ELASTICPG_RESTART_COUNT")


def main() -> None:
    mode = sys.argv[1]
    rank = int(os.environ["RANK"])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # queued until we wait for it
    info = {"pid": os.getpid(), **{k: os.environ.get(k) for k in KEYS}}
    if mode == "linger" and rank == 0:
        # in this worker's process group, deaf to the Ctrl-C the launcher forwards there
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"])
        info["grandchild"] = child.pid
    if mode == "linger" and rank == 1:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("worker " + json.dumps(info), flush=True)
    if mode == "crash" and rank == int(sys.argv[2]):
        print("crashing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if signal.sigtimedwait({signal.SIGUSR1}, 120) is None:
        sys.exit("nobody sent SIGUSR1 within 120 s")


if __name__ == "__main__":
    main()
