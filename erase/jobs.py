"""`erase run --jobs FILE`: a list of erasures for pipelines that sanitize many checkpoints.

A jobs file is TOML: an optional `[defaults]` table and one `[[job]]` table per erasure, each with `model`, any
`erase run` option under its long name (`concepts`, `method`, `out`, `steps`, `preserve`, ...), and an optional
`name`. Relative paths are relative to the jobs file. Every job goes through `erase run` itself, so it is
validated and runs exactly as the same flags would on the command line.

- A job that fails is reported and the others go on; the exit code is 0 only if every job succeeded.
- A job whose output already exists and records this job's digest and its input's sha256 is skipped, so a
  pipeline can re-run the file after a failure and only the missing outputs are made.
- Under a launcher (`torchrun`, `accelerate launch`: RANK and WORLD_SIZE set), rank r runs jobs r, r + N, ...
  (each job must fit one device); every rank prints its own summary and exits non-zero if one of its jobs failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from erase.config import read_toml
from erase.errors import UsageError

PATH_OPTIONS = ("model", "out", "delta", "concepts_file", "preserve_file", "anchor_prompts", "resume", "embedding")
LIST_OPTIONS = ("embedding",)  # repeatable options: a string or a list in the file
NOT_IN_JOBS = ("jobs", "config", "as_json", "job_digest")  # options of the file's own invocation, not of a job


@dataclass
class Job:
    index: int  # position in the file, from 1
    name: str
    options: dict  # run option name -> value, defaults merged, paths absolute
    digest: str  # sha256 of the options: what a finished output records

    @property
    def model(self) -> Path:
        return Path(self.options["model"])

    def output(self) -> Path:
        from erase.run import default_output

        return Path(self.options["out"]) if self.options.get("out") else default_output(self.model)


def load_jobs(path: Path, allowed: set[str]) -> list[Job]:
    """Read and check the whole file before anything runs: a typo must not surface after hours of other jobs."""
    data = read_toml(path, "--jobs")
    if set(data) - {"defaults", "job"}:
        raise UsageError(f"--jobs {path}: unknown table(s) {', '.join(sorted(set(data) - {'defaults', 'job'}))} (allowed: [defaults], [[job]])")
    entries = data.get("job", [])
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"--jobs {path}: no [[job]] tables")
    allowed = allowed - set(NOT_IN_JOBS)
    defaults = _options(data.get("defaults", {}), allowed, f"--jobs {path} [defaults]")
    jobs = []
    for i, entry in enumerate(entries, 1):
        name = str(entry.get("name", f"job {i}"))
        where = f"--jobs {path}, {name}"
        options = {**defaults, **_options({k: v for k, v in entry.items() if k != "name"}, allowed, where)}
        for required in ("model", "concepts"):
            if required not in options and not (required == "concepts" and "concepts_file" in options):
                raise UsageError(f"{where}: '{required}' is required")
        for key in PATH_OPTIONS:
            if options.get(key):
                resolved = [str((Path(path).parent / Path(p).expanduser()).resolve()) for p in _as_list(options[key])]
                options[key] = resolved if key in LIST_OPTIONS else resolved[0]
        digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
        jobs.append(Job(i, name, options, digest))
    outputs = [j.output() for j in jobs]
    if len(set(outputs)) != len(outputs):
        twice = sorted({str(o) for o in outputs if outputs.count(o) > 1})
        raise UsageError(f"--jobs {path}: several jobs write {', '.join(twice)}")
    return jobs


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _options(table: dict, allowed: set[str], where: str) -> dict:
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        name = "lam" if name == "lambda" else name
        if name not in allowed:
            raise UsageError(f"{where}: unknown key '{key}' (any `erase run` option by its long name)")
        if name in ("concepts", "preserve", "anchor") and isinstance(value, list):
            value = ", ".join(value)
        out[name] = value
    return out


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) set by torchrun / accelerate launch; (0, 1) without a launcher."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def already_done(job: Job) -> bool:
    """The output exists and records this job's options and the sha256 of the input it was made from."""
    from erase.checkpoint.formats import open_checkpoint
    from erase.checkpoint.write import sha256_file

    out = job.output()
    if not out.exists() or not job.model.exists():
        return False
    try:
        meta = open_checkpoint(out).metadata
    except Exception:  # an unreadable output is not a finished one; the job itself says why it cannot write
        return False
    return meta.get("erase.job_digest") == job.digest and meta.get("erase.input_sha256") == sha256_file(job.model)


def run_jobs(jobs: list[Job], invoke, console, *, rank: int = 0, world: int = 1) -> list[dict]:
    """Run this rank's share of `jobs`; `invoke(job)` runs one and returns its exit code. Returns one row per job."""
    mine = jobs[rank::world]
    rows = []
    for n, job in enumerate(mine, 1):
        where = f"rank {rank}/{world}, " if world > 1 else ""
        console.rule(f"[bold]{escape(job.name)}[/] ({where}{n} of {len(mine)}; job {job.index} of {len(jobs)} in the file)")
        t = time.perf_counter()
        if already_done(job):
            console.print(f"[dim]skipped: {job.output()} exists and records this job and its input[/]")
            rows.append({"job": job.name, "index": job.index, "status": "skipped", "exit_code": 0, "output": str(job.output()), "seconds": 0.0})
            continue
        job.output().parent.mkdir(parents=True, exist_ok=True)  # a jobs file lays out its outputs; `erase run` alone would refuse
        code = invoke(job)
        rows.append({"job": job.name, "index": job.index, "status": "ok" if code == 0 else "failed", "exit_code": code,
                     "output": str(job.output()), "seconds": round(time.perf_counter() - t, 1)})
        _release_memory()
    return rows


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
