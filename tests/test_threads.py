"""CPU threads chosen at start-up: the user's number, else the cores this process may use, shared among ranks."""

import os
import subprocess
import sys

import pytest

from erase.engine.threads import available_cores, choose_threads
from erase.errors import UsageError


def test_threads_come_from_the_flag_then_the_environment_then_the_affinity_mask():
    assert choose_threads(3, {"OMP_NUM_THREADS": "5"}) == (3, "--threads")
    assert choose_threads(None, {"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS")
    n, source = choose_threads(None, {})
    assert n == available_cores() == len(os.sched_getaffinity(0)) and source.startswith("affinity")
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": "2"})[0] == max(1, available_cores() // 2)  # ranks on one machine share
    assert choose_threads(None, {"LOCAL_WORLD_SIZE": str(10 * available_cores())})[0] == 1
    with pytest.raises(UsageError):
        choose_threads(0, {})


def test_the_cli_makes_openmp_waits_passive_before_torch_loads(tiny_sd1):
    # a fresh interpreter: the wait policy only counts if it is set before torch starts its OpenMP pool
    code = ("import os, sys\nfrom typer.testing import CliRunner\nfrom erase.cli import app\nassert 'torch' not in sys.modules\n"
            f"r = CliRunner().invoke(app, ['--threads', '1', 'inspect', {str(tiny_sd1)!r}])\nassert r.exit_code == 0, r.output\n"
            "import torch\nprint(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out == ["PASSIVE", "1"]
