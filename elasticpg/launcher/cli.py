"""`elasticpg run ...` (also `python -m elasticpg.run ...`): parse, set up the store, supervise."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .config import parse_args
from .policy import INTERRUPTED_BASE, ExitCode
from .store import LaunchError, store_for_workers
from .supervisor import Supervisor


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    world = config.nnodes * config.nproc_per_node
    try:
        with store_for_workers(config.store, world, config.store_timeout,
                               config.node_rank) as store:
            where = "hosted here" if config.store is None else "external"
            print(f"elasticpg run: {config.nproc_per_node} worker(s) on node "
                  f"{config.node_rank} of {config.nnodes} (world size {world}); store "
                  f"{store} ({where}); run id {config.run_id}", file=sys.stderr,
                  flush=True)
            return Supervisor(config, store).run()
    except LaunchError as exc:
        print(f"elasticpg run: {exc}", file=sys.stderr)
        return ExitCode.LAUNCH_ERROR
    except KeyboardInterrupt:  # Ctrl-C before any worker was started
        return INTERRUPTED_BASE + 2


if __name__ == "__main__":
    sys.exit(main())
