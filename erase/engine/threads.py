"""CPU threads, chosen once at start-up, before torch starts its OpenMP pool.

On a machine whose cores are shared (a CI runner, a workstation running something else), OpenMP's worker threads
spin while they wait for a core they cannot get: with one of two cores busy, `erase evaluate` took 269 s with
torch's defaults and 13 s with waiting threads made passive (benchmarks/contention.py). So, unless the user chose:

  threads   --threads N, else OMP_NUM_THREADS, else the cores this process may run on (its CPU affinity, which
            containers and `taskset` narrow) divided among the launcher's ranks on this machine (LOCAL_WORLD_SIZE)
  waiting   OMP_WAIT_POLICY=PASSIVE: idle workers sleep instead of spinning
"""

from __future__ import annotations

import os

from erase.errors import UsageError


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_threads(requested: int | None, environ=os.environ) -> tuple[int, str]:
    """(threads, where the number came from)."""
    if requested is not None:
        if requested < 1:
            raise UsageError("--threads must be >= 1")
        return requested, "--threads"
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    ranks = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cores() // max(1, ranks)), f"affinity ({available_cores()} cores / {ranks} rank{'s' * (ranks > 1)})"


def configure_threads(requested: int | None = None) -> tuple[int, str]:
    """Set the wait policy (effective only if torch is not loaded yet) and torch's intra-op thread count."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    n, source = choose_threads(requested)
    torch.set_num_threads(n)
    return n, source
