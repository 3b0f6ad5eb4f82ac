"""init_process_group through the launchers users use: mp.spawn with tcp://, torchrun with
env://, and destroy + re-init in the same process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .harness import HOST

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quickstart.py"


def _check_output(out: str, world: int) -> None:
    # ranks share one stdout (torchrun may interleave lines), so match records, not lines
    found = re.findall(r"rank (\d+): all_reduce=(\d+) ", out)
    assert sorted(int(r) for r, _ in found) == list(range(world)), out
    assert {int(v) for _, v in found} == {sum(range(world))}, out


def _run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_quickstart_under_mp_spawn_tcp_init():
    _check_output(_run([sys.executable, str(EXAMPLE)], {"WORLD": "3"}), 3)


def test_quickstart_under_torchrun_env_init():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", str(EXAMPLE)])
    _check_output(out, 2)


def job_reinit(rank: int, world: int, port: int) -> list[float]:
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
    sums = []
    for round_ in range(3):
        # a fresh key space per round, as a fresh env:// store would give
        dist.init_process_group("elasticpg", store=dist.PrefixStore(f"round{round_}", store),
                                rank=rank, world_size=world)
        t = torch.tensor([float(rank + round_)])
        dist.all_reduce(t)
        sums.append(t.item())
        dist.destroy_process_group()
    return sums


def test_destroy_and_reinit_in_same_process(pool):
    assert pool.run(job_reinit, world=3) == [[3.0, 6.0, 9.0]] * 3
