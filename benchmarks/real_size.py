"""Every command on a file of the real SD 1.5 size: wall time and peak RSS on this machine.

    python benchmarks/real_size.py [--dir /tmp] [--keep] [--only LABEL ...] [--conditions TEXT] [--json benchmarks/real_size.json]

Writes a random fp16 file with the full key set of the v1-5-pruned-emaonly release (tests/release_layouts.py:
1145 tensors, 1.07 B parameters, 2.1 GB; streamed, never held in memory), then runs, each in its own process:
`inspect`, `run --steps 2 --sample-steps 2` at 512 px (default preservation, `--preserve none`, and with gradient
checkpointing), `run --method uce`
(end to end, beside the time to copy the file), `generate` one 512 px image (4 DDIM steps: the cost per step is what
matters), `merge` of the erased file onto the input, and one unit of each robustness tool: `run --method uce --robust 3`,
one `run --adversarial` step (2 inner steps) and `attack` with 2 UnlearnDiffAtk steps on one prompt (`--only` picks rows). Peak RSS comes from the kernel's accounting of that
process (wait4), reported in GB and as a multiple of the file size. `run` must stay below the file size plus the
UNet in fp32 (no second UNet, no VAE, no text encoder after encoding).
Writes the record to --json after every row: per row (by label) its seconds, peak RSS, last output line and the
machine's `--conditions` (free text: "idle", "contended: ..."), plus the file size, tensor count, copy time and torch
version; with `--only`, rows not run keep their recorded values. `table(record)` renders the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from shapes import BEFORE_36_FLAGS  # noqa: E402  (the record was measured with erase run's defaults of before issue 36)


def timed(args: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, output tail) of `erase ARGS` in a child process."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "erase", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"erase {' '.join(args)} failed ({p.returncode}):\n{out[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, out.strip().splitlines()[-1] if out.strip() else ""


def line(row: dict, file_bytes: int) -> str:
    return f"| {row['label']} | {row['seconds']:.1f} | {row['peak_rss_bytes'] / 1e9:.2f} | {row['peak_rss_bytes'] / file_bytes:.2f} |"


def table(record: dict, labels: list[str] | None = None) -> str:
    """The Markdown table of the recorded rows named by LABELS (all, in record order, if None)."""
    rows = {r["label"]: r for r in record["rows"]}
    lines = ["| command | wall s | peak RSS GB | RSS / file size |", "|---|---|---|---|"]
    return "\n".join(lines + [line(rows[label], record["file_bytes"]) for label in (list(rows) if labels is None else labels)])


BOUNDED = ("run (2 steps, K = 2, 512 px)", "run --gradient-checkpointing")  # the runs held to the file + fp32 UNet bound


def bound_lines(record: dict) -> str:
    """`run`'s memory bound (the file plus the UNet in fp32) and where each recorded run's peak falls against it."""
    bound = record["file_bytes"] + record["unet_fp32_bytes"]
    rows = {r["label"]: r["peak_rss_bytes"] for r in record["rows"]}
    lines = [f"run's bound (file + UNet in fp32): {record['file_bytes'] / 1e9:.2f} + {record['unet_fp32_bytes'] / 1e9:.2f} = {bound / 1e9:.2f} GB"]
    lines += [f"{label}: {rows[label] / 1e9:.2f} GB, {'within' if rows[label] < bound else 'OVER'} the bound by {abs(bound - rows[label]) / 1e9:.2f} GB"
              for label in BOUNDED if label in rows]
    return "\n".join(lines)


def main() -> None:
    from release_layouts import sd15, write_streamed

    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--only", action="append", default=[],
                    help="run only the commands whose label contains this (repeatable); the others keep their record")
    ap.add_argument("--conditions", default="", help='the machine\'s state, recorded with every row run (e.g. "idle")')
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "real_size.json")
    args = ap.parse_args()
    src, out, merged = (args.dir / f"erase-real-{n}.safetensors" for n in ("sd15", "erased", "merged"))
    layout = sd15()
    t = time.perf_counter()
    size = write_streamed(layout, src)
    print(f"wrote {src}: {len(layout.specs())} tensors, {size / 1e9:.2f} GB fp16, in {time.perf_counter() - t:.0f} s")
    unet_fp32 = 4 * sum(int(__import__("math").prod(s.shape)) for s in layout.unet())
    rows = [
        ("inspect", ["inspect", str(src)]),
        ("run (2 steps, K = 2, 512 px)", ["run", str(src), "-c", "a cat", "--steps", "2", "--sample-steps", "2", "--resolution", "512",
                                           "--device", "cpu", "-o", str(out), "--force", *BEFORE_36_FLAGS]),
        ("run --preserve none (the reference SDD: no frozen copy, no retain term)",
         ["run", str(src), "-c", "a cat", "--steps", "2", "--sample-steps", "2", "--resolution", "512", "--device", "cpu",
          "--preserve", "none", "-o", str(out), "--force"]),
        ("run --gradient-checkpointing", ["run", str(src), "-c", "a cat", "--steps", "2", "--sample-steps", "2", "--resolution", "512",
                                          "--device", "cpu", "--gradient-checkpointing", "-o", str(out), "--force", *BEFORE_36_FLAGS]),
        ("run --method uce (defaults: --preserve auto)", ["run", str(src), "-c", "a cat", "--method", "uce", "-o", str(out), "--force"]),
        ("run --method uce --preserve none", ["run", str(src), "-c", "a cat", "--method", "uce", "--preserve", "none", "-o", str(out), "--force"]),
        ("generate (1 image, 512 px, 4 steps)", ["generate", str(src), "-p", "a cat", "--steps", "4", "--size", "512", "--device", "cpu",
                                                  "-o", str(args.dir / "erase-real-images")]),
        ("merge (erased onto the input)", ["merge", str(src), str(out), "--base", str(src), "-o", str(merged), "--force"]),
        # robustness (erase attack, RECE, adversarial training): one unit of each at full size
        ("run --method uce --robust 3 (RECE, default preservation)", ["run", str(src), "-c", "a cat", "--method", "uce", "--robust", "3",
                                                                     "-o", str(out), "--force"]),
        ("run --adversarial (1 step, K = 2, 512 px, 2 inner attack steps)",
         ["run", str(src), "-c", "a cat", "--steps", "1", "--sample-steps", "2", "--resolution", "512", "--device", "cpu", "--adversarial",
          "--adversarial-steps", "2", "--adversarial-lr", "1e-3", *[f for f in BEFORE_36_FLAGS if f != "--no-adversarial"], "-o", str(out),
          "--force"]),
        ("attack --attack unlearndiffatk (1 prompt, 2 steps, images 512 px with 2 DDIM steps)",
         ["attack", str(out), "--concept", "nudity", "--base", str(src), "--attack", "unlearndiffatk", "--limit", "1", "--steps", "2",
          "--eval-every", "2", "--sample-steps", "2", "--size", "512", "--device", "cpu", "--batch", "1", "-o", str(args.dir / "erase-real-attack"),
          "--force"]),
    ]
    t = time.perf_counter()  # the yardstick for UCE's end-to-end time: copying the file
    shutil.copyfile(src, merged)
    with open(merged, "rb+") as f:
        os.fsync(f.fileno())
    copy_seconds = time.perf_counter() - t
    print(f"copying the file (shutil.copyfile + fsync): {copy_seconds:.1f} s")
    merged.unlink()
    print("\n| command | wall s | peak RSS GB | RSS / file size |\n|---|---|---|---|")
    recorded = {r["label"]: r for r in json.loads(args.json.read_text())["rows"]} if args.only and args.json.exists() else {}
    for label, cmd in rows:
        if args.only and not any(o in label for o in args.only):
            continue
        seconds, rss, last = timed(cmd)
        recorded[label] = {"label": label, "seconds": seconds, "peak_rss_bytes": rss, "last_line": last, "conditions": args.conditions}
        record = {"conditions": args.conditions, "torch": version("torch"), "file_bytes": size, "tensors": len(layout.specs()),
                  "unet_fp32_bytes": unet_fp32, "copy_seconds": copy_seconds,
                  "rows": [recorded[lbl] for lbl, _ in rows if lbl in recorded]}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(line(recorded[label], size), flush=True)
    print("\n" + bound_lines(record))
    if not args.keep:
        for p in (src, out, merged, out.with_name(out.stem + ".report.json")):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
