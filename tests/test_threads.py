"""CPU threads chosen at start-up: the user's number, else the cores this process may use that are free, shared among
a launcher's ranks."""

import os
import subprocess
import sys

import pytest

from erase.engine.threads import available_cores, busy_cores, choose_threads
from erase.errors import UsageError


def test_threads_come_from_the_flag_then_the_environment_then_the_free_cores():
    idle, one_busy = (lambda: 0.0), (lambda: 1.2)
    assert choose_threads(3, {"OMP_NUM_THREADS": "5"}, idle) == (3, "--threads")
    assert choose_threads(None, {"OMP_NUM_THREADS": "5"}, one_busy) == (5, "OMP_NUM_THREADS")
    cores = available_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert choose_threads(None, {}, idle)[0] == cores
    assert choose_threads(None, {}, one_busy)[0] == max(1, cores - 1)  # a core another process holds is left to it
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": "2"}, idle)[0] == max(1, cores // 2)  # ranks on one machine share
    assert choose_threads(None, {}, lambda: 10.0 * cores)[0] == 1
    with pytest.raises(UsageError):
        choose_threads(0, {}, idle)


def test_a_busy_core_is_seen_and_left_out_at_start_up(tiny_sd1):
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cores(0.3) >= 0.7  # the hog's core (more if other tests run beside this one)
        code = ("import sys\nfrom typer.testing import CliRunner\nfrom erase.cli import app\n"
                f"r = CliRunner().invoke(app, ['inspect', {str(tiny_sd1)!r}])\nassert r.exit_code == 0, r.output\n"
                "import torch\nprint(torch.get_num_threads())")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        threads = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)
    finally:
        hog.kill()
    assert threads <= max(1, available_cores() - 1)
