"""One node of a NodePool: `python -m elasticpg.netns.node <jobs fd> <results fd>`.

Started inside a host's namespace by `ip netns exec`; imports torch and elasticpg once,
reports ready, then runs the jobs it reads until its job pipe closes."""

from __future__ import annotations

import os
import sys
import traceback


def main(argv: list[str]) -> int:
    jobs, results = int(argv[0]), int(argv[1])
    os.set_inheritable(jobs, False)
    os.set_inheritable(results, False)
    import torch

    torch.set_num_threads(1)
    import elasticpg  # noqa: F401  (registers the backend)

    from ..cli.launching import reset_torch_distributed
    from .nodes import read_msg, write_msg

    write_msg(results, ("ready", os.getpid()))
    while True:
        msg = read_msg(jobs)
        if msg is None:
            return 0  # the pool closed our pipe
        job, fn, rank, world, store, args = msg
        try:
            out = (job, "ok", fn(rank, world, store, *args))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            out = (job, "error", traceback.format_exc())
        finally:
            reset_torch_distributed()
        write_msg(results, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
