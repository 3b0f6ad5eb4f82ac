"""`elasticpg run`: a torchrun-style launcher that restarts only the worker that died.

config.py       the command line (torchrun's interface plus the restart policy)
environment.py  the worker's environment: torchrun's variables and the replacement mark
policy.py       per-slot supervision and restart policy: a pure decision table
output.py       worker output, line by line, prefixed with rank and restart count
store.py        the store the workers rendezvous on (hosted here, an external TCPStore, or etcd)
supervisor.py   the process shell: starts, watches, signals and reaps workers
cli.py          main()
"""
