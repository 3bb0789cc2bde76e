"""CPU threads, chosen once at start-up, before torch starts its OpenMP pool.

On a machine whose cores are shared (a CI runner, a workstation running something else), OpenMP's worker threads
spin while they wait for a core they cannot get: with one of two cores busy, torch's default two threads made
`erase run` 2.9x slower than one thread (benchmarks/contention.json). Making idle threads sleep instead
(OMP_WAIT_POLICY=PASSIVE) fixed that but made an idle machine up to 2x slower on small models, so erase does neither
by default: it counts the cores that are free when it starts and uses those.

  threads   --threads N, else OMP_NUM_THREADS, else the cores this process may run on (its affinity mask, which
            containers and `taskset` narrow) that are not busy with other work at start-up (a 0.1 s look at
            /proc/stat), shared among the launcher's ranks on this machine (LOCAL_WORLD_SIZE)
A load that starts after erase has started is not seen: set --threads (or OMP_NUM_THREADS) for a machine known to be
shared, or OMP_WAIT_POLICY=PASSIVE, which erase leaves to the user.
"""

from __future__ import annotations

import os
import time

from erase.errors import UsageError


def _cores() -> set[int]:
    """The cores this process may run on (its affinity mask), not the machine's."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def available_cores() -> int:
    return len(_cores())


def _cpu_times(cores: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over `cores` from /proc/stat; None where there is no /proc/stat."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return busy, total


def busy_cores(window: float = 0.1) -> float:
    """How many of this process's cores other work kept busy over `window` seconds (this process sleeps meanwhile)."""
    cores = _cores()
    before = _cpu_times(cores)
    if before is None:
        return 0.0
    time.sleep(window)
    after = _cpu_times(cores)
    elapsed = after[1] - before[1]
    return len(cores) * (after[0] - before[0]) / elapsed if elapsed > 0 else 0.0


def choose_threads(requested: int | None, environ=os.environ, busy=busy_cores) -> tuple[int, str]:
    """(threads, where the number came from). `busy()` is only asked when nothing else decides."""
    if requested is not None:
        if requested < 1:
            raise UsageError("--threads must be >= 1")
        return requested, "--threads"
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores, taken = available_cores(), round(busy())
    ranks = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free = max(1, cores - taken)
    return max(1, free // ranks), f"{cores} cores, {min(taken, cores)} busy at start-up, {ranks} rank{'s' * (ranks > 1)}"


def configure_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op thread count for this process (before its first parallel work)."""
    import torch

    n, source = choose_threads(requested)
    torch.set_num_threads(n)
    return n, source
