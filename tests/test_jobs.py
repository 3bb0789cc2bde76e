"""`erase run --jobs FILE`: many erasures from one file, failures isolated, re-runs skip finished outputs, ranks share."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from erase.checkpoint.formats import open_checkpoint
from erase.cli import app

runner = CliRunner()


def _jobs_file(tmp_path, model, *, bad_model="missing.safetensors"):
    (tmp_path / "jobs.toml").write_text(f"""
[defaults]
method = "uce"
preserve = "dog"
device = "cpu"  # a default every method takes, UCE included

[[job]]
name = "cat"
model = "{model}"
concepts = ["cat"]
out = "out/cat.safetensors"

[[job]]
name = "broken"
model = "{bad_model}"
concepts = "cat"
out = "out/broken.safetensors"

[[job]]
name = "tree, sdd"
model = "{model}"
concepts = "tree"
method = "sdd"
steps = 2
sample-steps = 2
resolution = 32
expand = false
out = "out/tree.safetensors"
""")
    return tmp_path / "jobs.toml"


def test_a_bad_job_fails_alone_and_the_exit_code_says_so(tiny_sd1, tmp_path):
    jobs = _jobs_file(tmp_path, tiny_sd1)
    r = runner.invoke(app, ["run", "--jobs", str(jobs)])
    assert r.exit_code == 1, r.output
    assert "1 of 3 jobs failed: broken" in r.output
    cat, tree = open_checkpoint(tmp_path / "out" / "cat.safetensors"), open_checkpoint(tmp_path / "out" / "tree.safetensors")
    assert cat.metadata["erase.method"] == "uce" and json.loads(cat.metadata["erase.preserve"]) == ["", "dog"]  # [defaults] apply
    assert tree.metadata["erase.method"] == "sdd" and json.loads(tree.metadata["erase.concepts"]) == ["tree"]  # the job's own win
    assert json.loads(tree.metadata["erase.config"])["method_config"]["expand"] is False  # booleans become --no-expand
    assert not (tmp_path / "out" / "broken.safetensors").exists()


def test_a_job_value_of_the_wrong_kind_fails_that_job_in_one_line(tiny_sd1, tmp_path):
    (tmp_path / "jobs.toml").write_text(f"""
[defaults]
model = "{tiny_sd1}"
concepts = "cat"
device = "cpu"

[[job]]
name = "no such method"
method = "nope"
out = "a.safetensors"

[[job]]
name = "steps in words"
steps = "many"
out = "b.safetensors"

[[job]]
name = "fine"
method = "uce"
out = "c.safetensors"
""")
    r = runner.invoke(app, ["run", "--jobs", str(tmp_path / "jobs.toml")])
    assert r.exit_code == 1, r.output
    assert "Invalid value for '--method'" in r.output and "Invalid value for '--steps'" in r.output, r.output
    assert "2 of 3 jobs failed" in r.output and "Traceback" not in r.output
    assert (tmp_path / "c.safetensors").exists() and not (tmp_path / "a.safetensors").exists()


def test_rerun_skips_outputs_that_record_their_job_and_input(tiny_sd1, tmp_path):
    jobs = _jobs_file(tmp_path, tiny_sd1)
    runner.invoke(app, ["run", "--jobs", str(jobs)])
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    r = runner.invoke(app, ["run", "--jobs", str(jobs)])
    assert r.exit_code == 1 and r.output.count("skipped") >= 2
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == made  # nothing rewritten
    # a changed job is not the recorded one: it runs, and refuses the existing file (no force), like `erase run` would
    jobs.write_text(jobs.read_text().replace('concepts = ["cat"]', 'concepts = ["cat", "tree"]'))
    r = runner.invoke(app, ["run", "--jobs", str(jobs)])
    assert r.exit_code == 1 and "2 of 3 jobs failed: cat, broken" in r.output and "exists" in r.output


@pytest.mark.parametrize("content, message", [
    ('[[job]]\nmodel = "m.safetensors"\nconcepts = "cat"\nstepz = 3\n', "unknown key 'stepz'"),
    ('[[job]]\nconcepts = "cat"\n', "'model' is required"),
    ('[defaults]\nmethod = "uce"\n', "no [[job]] tables"),
    ('[[job]]\nmodel = "m.safetensors"\nconcepts = "a"\n[[job]]\nmodel = "m.safetensors"\nconcepts = "b"\n', "several jobs write"),
    ('[[job]]\nmodel = "m.safetensors"\nconcepts = "cat"\njson = true\n', "unknown key 'json'"),
])
def test_a_malformed_file_is_refused_before_any_job_runs(tmp_path, content, message):
    (tmp_path / "jobs.toml").write_text(content)
    r = runner.invoke(app, ["run", "--jobs", str(tmp_path / "jobs.toml")])
    assert r.exit_code == 2 and message in r.output, r.output


def test_jobs_take_no_model_or_flags_beside_them(tiny_sd1, tmp_path):
    jobs = _jobs_file(tmp_path, tiny_sd1)
    for extra in ([str(tiny_sd1)], ["--steps", "3"]):
        r = runner.invoke(app, ["run", "--jobs", str(jobs), *extra])
        assert r.exit_code == 2 and "--jobs takes every option from the jobs file" in r.output
    r = runner.invoke(app, ["run", "--concepts", "cat"])
    assert r.exit_code == 2 and "missing MODEL" in r.output


def test_torchrun_spreads_jobs_over_ranks(tiny_sd1, tmp_path):
    jobs = _jobs_file(tmp_path, tiny_sd1, bad_model=tiny_sd1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0", "-m", "erase",
                        "run", "--jobs", str(jobs)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank 0 of 2" in p.stdout and "rank 1 of 2" in p.stdout
    assert "(rank 0/2, 1 of 2; job 1 of 3" in p.stdout and "(rank 1/2, 1 of 1; job 2 of 3" in p.stdout  # r runs jobs r, r + 2
    assert all((tmp_path / "out" / f"{n}.safetensors").exists() for n in ("cat", "broken", "tree"))


def test_a_job_erases_a_learned_token_given_by_a_path_relative_to_the_file(tiny_sd1, tmp_path):
    import torch

    from erase.embeddings import Embedding, save_embedding

    (tmp_path / "tokens").mkdir()
    save_embedding(Embedding("<flagged>", [torch.randn(1, 32)]), tmp_path / "tokens" / "flagged.safetensors")
    (tmp_path / "jobs.toml").write_text(f"""
[[job]]
model = "{tiny_sd1}"
concepts = "<flagged>"
method = "uce"
embedding = ["tokens/flagged.safetensors"]
out = "token.safetensors"
""")
    r = runner.invoke(app, ["run", "--jobs", str(tmp_path / "jobs.toml")])
    assert r.exit_code == 0, r.output
    config = json.loads(open_checkpoint(tmp_path / "token.safetensors").metadata["erase.config"])
    assert config["embeddings"][0]["path"] == str(tmp_path / "tokens" / "flagged.safetensors")
