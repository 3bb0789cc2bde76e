"""The CPU path on a shared machine: `erase run`, `generate` and `evaluate`, idle and beside a process that keeps one
core busy (started before the command), under erase's start-up (the cores free when it starts), torch's default (every
core, idle OpenMP threads spinning), every core with idle threads sleeping (OMP_WAIT_POLICY=PASSIVE), and one thread
as the yardstick. Side by side, in one run.

    python benchmarks/contention.py [--json benchmarks/contention.json] [--repeats 1]

Each cell is the wall time of the whole command in a fresh process (`python -m erase ...`), start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "shapes" / "shapes-sd.safetensors"
sys.path.insert(0, str(ROOT / "benchmarks"))
from shapes import BEFORE_36_FLAGS  # noqa: E402  (the record was measured with the defaults of before issue 36)

COMMANDS = {  # small jobs on the shapes model; {work} is a scratch folder
    "run": ["run", str(MODEL), "--concepts", "circle", "--steps", "4", "--reuse", "8", "--lr", "1e-3", "--device", "cpu",
            "--out", "{work}/o.safetensors", "--force", *BEFORE_36_FLAGS],
    "generate": ["generate", str(MODEL), "--prompt", "a red circle", "--n", "4", "--steps", "20", "--size", "32", "--device", "cpu",
                 "--out", "{work}/gen"],
    "evaluate": ["evaluate", str(MODEL), "--detector", "shapes", "--prompts", "builtin:shapes", "--target", "circle", "--limit", "8",
                 "--steps", "20", "--guidance", "5", "--device", "cpu", "--out", "{work}/eval"],
}
CORES = str(len(os.sched_getaffinity(0)))
SETTINGS = {  # name -> environment changes (None: removed)
    "erase (the cores free at start-up)": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None},
    "every core, spinning waits (torch's default)": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": CORES},
    "every core, passive waits": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": CORES},
    "one thread": {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": "1"},
}


def timed(command: list[str], env: dict, work: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    args = [a.replace("{work}", str(work)) for a in command]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "erase", *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "contention.json")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell, the fastest kept (the first run of a command also warms the page cache)")
    args = ap.parse_args()
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("idle", "one core busy"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
            try:
                for command, argv in COMMANDS.items():
                    for setting, changes in SETTINGS.items():
                        env = dict(os.environ, HF_HUB_OFFLINE="1")
                        for k, v in changes.items():
                            env.pop(k, None) if v is None else env.__setitem__(k, v)
                        seconds = min(timed(argv, env, Path(tmp) / f"{command}-{len(cells)}") for _ in range(args.repeats))
                        cells.append({"load": load, "command": command, "setting": setting, "seconds": seconds})
                        print(f"{load:14} {command:9} {setting:40} {seconds:7.1f} s", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
    cores = len(os.sched_getaffinity(0))
    args.json.write_text(json.dumps({"cores": cores, "commands": COMMANDS, "settings": SETTINGS, "cells": cells}, indent=2))
    print(table(cells))


def table(cells: list[dict]) -> str:
    """Seconds per cell, and each one's ratio to one thread under the same load."""
    one = {(c["load"], c["command"]): c["seconds"] for c in cells if c["setting"] == "one thread"}
    lines = ["| load | command | setting | seconds | vs one thread |", "|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['load']} | {c['command']} | {c['setting']} | {c['seconds']:.1f} | {c['seconds'] / one[(c['load'], c['command'])]:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
