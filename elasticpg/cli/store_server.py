"""`elasticpg store-server`: a standalone TCPStore server, so that no worker hosts the control
plane (a worker that hosts the store takes the whole group down when it dies; this process does
not run any rank, so any rank, rank 0 included, can die and be replaced).

Workers reach it as an ordinary TCPStore: ``init_process_group(..., store=TCPStore(host, port,
is_master=False))``, ``MASTER_ADDR``/``MASTER_PORT`` with the default env:// rendezvous, or
``elasticpg run --store host:port``. It keeps every key in memory: when this process dies the
group's control plane is gone with it (use the etcd store for one that survives a machine).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from .launching import HOST, listen_store


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="elasticpg store-server",
                                description="Run a standalone TCPStore server until SIGINT or "
                                            "SIGTERM.")
    p.add_argument("--host", default=HOST,
                   help="address to listen on (default %(default)s; 0.0.0.0 for every "
                        "interface)")
    p.add_argument("--port", type=int, default=29500,
                   help="port to listen on (default %(default)s; 0: any free port, printed)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="the server's store timeout in seconds (default %(default)s)")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        p.error(f"--port {args.port}: expected 0..65535")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        store, port = listen_store(1, args.timeout, host=args.host, port=args.port)
    except (OSError, RuntimeError) as exc:  # a taken port, an address not ours
        print(f"elasticpg store-server: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"elasticpg store-server: listening on {args.host}:{port}", flush=True)
    while not stop.wait(3600):
        pass
    del store
    print("elasticpg store-server: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
