"""`elasticpg <command> ...`: one entry point; each command lives in a module of its own.

The table maps a command to "module:function"; the module is imported only when its command
runs, so `elasticpg status` does not pay for what `elasticpg demo` needs. Each function takes
the remaining arguments (a list of strings) and returns the process exit status.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "bench": ("elasticpg.cli.bench:main", "collectives side by side with gloo"),
    "ep-bench": ("elasticpg.cli.epbench:main", "expert-parallel dispatch/combine vs gloo"),
    "failover": ("elasticpg.cli.failover:main", "failure detection and resume times"),
    "joinbench": ("elasticpg.cli.joinbench:main", "deferred-join timings"),
    "hier-bench": ("elasticpg.cli.hierbench:main",
                   "collectives over hosts x ranks: hierarchical vs flat TCP vs gloo"),
    "scale-sim": ("elasticpg.cli.scale_sim:main", "cost of a membership change at 64..1024 ranks"),
    "demo": ("elasticpg.demo.cli:main", "MoE serving through a SIGKILL and a deferred join"),
    "status": ("elasticpg.cli.status:main",
               "every group's current view in a store (TCPStore or etcd), --json, --watch"),
    "store-server": ("elasticpg.cli.store_server:main", "a standalone TCPStore server"),
    "run": ("elasticpg.launcher.cli:main",
            "launch a script like torchrun; restart only a worker that dies, as a replacement"),
}


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {n:<{width}}  {h}" for n, (_, h) in sorted(COMMANDS.items())]
    return "usage: elasticpg <command> [args...]\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"elasticpg: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
