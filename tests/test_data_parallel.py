"""`--batch-size` and data parallel under a launcher (torchrun here; accelerate launch sets the same variables).

Two processes of batch 1 train on the same sample streams as one process of batch 2, so they must end at the same
weights. Not bit for bit: a batch of two goes through other float reductions than two batches of one, and AdamW's
normalised steps carry such differences forward; the tolerance below is 1% of what training moved the weights, and
batch 1 on one process (other samples) differs by about 100%.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from erase.cli import app

runner = CliRunner()
ARGS = ["--concepts", "cat", "--steps", "4", "--sample-steps", "4", "--reuse", "2", "--preserve", '""', "--resolution", "32",
        "--device", "cpu", "--lr", "1e-2"]
LAUNCHED = Path(__file__).with_name("launched.py")


def _launch(model, out, *extra, stop_at=None, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **({"STOP_AT": str(stop_at)} if stop_at else {}), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(LAUNCHED),
                           "run", str(model), *ARGS, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=600)


def _attn2(path):
    return {k: v.double() for k, v in load_file(str(path)).items() if "attn2" in k}


def _distance(a, b):
    return sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt().item()


@pytest.fixture(scope="module")
def single(tiny_sd1, tmp_path_factory):
    """One process: batch 2 and batch 1."""
    folder = tmp_path_factory.mktemp("single")
    for b in (1, 2):
        r = runner.invoke(app, ["run", str(tiny_sd1), *ARGS, "--batch-size", str(b), "--out", str(folder / f"b{b}.safetensors")])
        assert r.exit_code == 0, r.output
    return folder


def test_batch_size_trains_more_samples_per_step_and_reports_them(single, tiny_sd1):
    b1, b2 = (json.loads((single / f"b{b}.report.json").read_text()) for b in (1, 2))
    assert (b2["effective_batch"], b2["batch_per_rank"], b2["world_size"]) == (2, 2, 1)
    assert 1.8 < b2["unet_evals_per_step"] / b1["unet_evals_per_step"] < 2.4  # twice the samples, about twice the UNet work
    assert b2["config"]["lr_rule"].startswith("none") and b2["lr"] == 1e-2
    base = _attn2(tiny_sd1)
    assert _distance(_attn2(single / "b1.safetensors"), _attn2(single / "b2.safetensors")) > 0.3 * _distance(base, _attn2(single / "b2.safetensors"))


def test_scale_lr_multiplies_the_rate_by_the_effective_batch(tiny_sd1, tmp_path):
    r = runner.invoke(app, ["run", str(tiny_sd1), *ARGS, "--steps", "1", "--batch-size", "2", "--scale-lr", "--out", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.report.json").read_text())["lr"] == 2e-2


@pytest.mark.parametrize("method", ["ca", "uce"])
def test_methods_without_batches_refuse_a_batch_size(tiny_sd1, tmp_path, method):
    extra = ["--anchor", "dog"] if method == "ca" else []
    r = runner.invoke(app, ["run", str(tiny_sd1), "--concepts", "cat", "--method", method, *extra, "--batch-size", "2", "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "batch-size" in r.output and not (tmp_path / "x.safetensors").exists()


@pytest.fixture(scope="module")
def launched(tiny_sd1, tmp_path_factory):
    """Two processes of batch 1, run to the end once for the tests below: (the launch, its output folder)."""
    folder = tmp_path_factory.mktemp("launched")
    return _launch(tiny_sd1, folder / "dp.safetensors"), folder


def test_two_processes_train_like_one_process_with_batch_two(single, tiny_sd1, launched):
    p, folder = launched
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    assert sorted(f.name for f in folder.iterdir()) == ["dp.report.json", "dp.safetensors"]
    report = json.loads((folder / "dp.report.json").read_text())
    assert (report["world_size"], report["batch_per_rank"], report["effective_batch"]) == (2, 1, 2)
    assert report["config"]["adversarial"] is not None  # the default's inner attack: its prefix is averaged over the ranks too
    base, dp, b2 = _attn2(tiny_sd1), _attn2(folder / "dp.safetensors"), _attn2(single / "b2.safetensors")
    assert _distance(dp, b2) < 0.01 * _distance(base, b2)


def test_an_interrupted_launch_resumes_where_it_stopped(tiny_sd1, tmp_path, launched):
    full, folder = launched
    assert full.returncode == 0, full.stderr
    part = _launch(tiny_sd1, tmp_path / "part.safetensors", stop_at=2)  # Ctrl-C on every rank after step 2
    assert part.returncode != 0 and not (tmp_path / "part.safetensors").exists()
    state = tmp_path / "part.resume"
    assert sorted(f.name for f in state.iterdir()) == ["state.pt", "state.rank1.pt"]  # each rank's own draws and queues
    resumed = _launch(tiny_sd1, tmp_path / "part.safetensors", "--resume", str(state))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = load_file(str(folder / "dp.safetensors")), load_file(str(tmp_path / "part.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same processes, same batches: bit for bit on the CPU


def test_a_cuda_rank_sets_its_device_before_joining_the_group(monkeypatch):
    # NCCL binds a rank to the current device when the group starts: without set_device first every rank (UCE's solve
    # included, which joins only to wait) uses cuda:0 ("Duplicate GPU detected", or a hang)
    import torch
    import torch.distributed as dist

    from erase.engine.distributed import join

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("ERASE_NO_DATA_PARALLEL", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    world = join("cuda")
    assert calls == [("set_device", 1), ("init", "nccl")]
    assert (world.rank, world.size, world.local_rank) == (1, 2, 1)


def test_a_launch_that_started_one_process_instead_of_several_says_so(tiny_sd1, tmp_path, monkeypatch):
    # `accelerate launch --cpu --num_processes 2` without MPI: one process, MASTER_ADDR set, no WORLD_SIZE
    from erase.engine.distributed import launcher_note

    assert launcher_note({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}) is not None
    assert launcher_note({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}) is None  # --multi_gpu: real ranks
    assert launcher_note({"ACCELERATE_USE_CPU": "True"}) is None  # one process asked for
    assert launcher_note({}) is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = CliRunner().invoke(app, ["run", str(tiny_sd1), "-c", "cat", "--method", "uce", "--preserve", "none", "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0 and "accelerate launch started one process" in r.output and "--multi_gpu" in r.output


def test_a_nan_loss_on_one_rank_stops_every_rank_at_that_step(tiny_sd1, tmp_path):
    # the NaN guard sees every rank's loss at once: rank 0 must not wait in the all-reduce for a rank that stopped
    out = tmp_path / "o.safetensors"
    r = _launch(tiny_sd1, out, env_extra={"NAN_AT": "2", "NAN_RANK": "1"})
    assert r.returncode != 0
    assert r.stderr.count("loss became nan at step 2 on rank 1") + r.stdout.count("loss became nan at step 2 on rank 1") == 2  # both ranks say so
    assert not out.exists() and not list(tmp_path.glob("*.safetensors"))


def test_ranks_whose_weights_differ_refuse_to_write(tiny_sd1, tmp_path):
    # every rank takes the same steps, so their weights agree bit for bit; if they do not, nothing is written
    out = tmp_path / "o.safetensors"
    r = _launch(tiny_sd1, out, env_extra={"DIVERGE_RANK": "1"})
    assert r.returncode != 0
    assert "the ranks' EMA weights differ; refusing to write an output" in r.stdout + r.stderr
    assert not out.exists()
