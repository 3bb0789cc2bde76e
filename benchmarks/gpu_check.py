"""`make gpu-check`: the first run on a CUDA GPU, as one command.

    python benchmarks/gpu_check.py [--steps 10] [--dir /tmp] [--json benchmarks/gpu_check.json]

On whatever CUDA device PyTorch sees:
  1. the precision tests that have a CUDA variant (tests/test_precision.py with ERASE_TEST_DEVICE=cuda): bf16 (and fp16
     with loss scaling) runs move the weights as fp32 does, a run at a vanishing learning rate writes the input back bit
     for bit, gradient checkpointing trains the same weights; the data-parallel tests need two GPUs (NCCL) and run only
     where PyTorch sees two;
  2. one erasure at Stable Diffusion 1.5's size on random weights (the v1-5-pruned-emaonly layout, fp16) at 512 px with
     erase run's defaults (preservation on), --steps steps, under --precision auto (bf16 where the GPU computes it
     natively, fp16 with loss scaling before Ampere) and, on a bf16 GPU, fp16 as well: seconds per step, UNet calls and
     single-sample evaluations per step, peak memory against erase's estimate (erase.engine.memory);
  3. the record (--json), from which benchmarks/tables.py makes the README's table.
Without a CUDA GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def erasure(model: Path, out: Path, precision: str, steps: int) -> dict:
    """`erase run` with its defaults at 512 px, in its own process; the run report plus the memory estimate for it."""
    cmd = [sys.executable, "-m", "erase", "run", str(model), "-c", "nudity", "--steps", str(steps), "--resolution", "512",
           "--device", "cuda", "--precision", precision, "-o", str(out), "--force", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        return {"precision": precision, "failed": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    report = json.loads(done.stdout)
    return {"precision": precision, "label": report["config"]["precision"], "seconds_per_step": report["seconds_per_step"],
            "unet_evals_per_step": report["unet_evals_per_step"], "unet_calls_per_step": report["unet_calls_per_step"],
            "peak_bytes": report["peak_memory"]["bytes"], "estimate_bytes": report.get("memory_estimate", {}).get("total")}


def table(record: dict) -> str:
    """The README's table (a line saying so while nothing has been recorded)."""
    if not record.get("runs"):
        return "No CUDA run has been recorded yet: `make gpu-check` on a machine with an NVIDIA GPU fills this table."
    lines = [f"{record['device']} (torch {record['torch']}, CUDA {record['cuda']}); precision tests: {record['tests']}", "",
             "| precision | s / step | UNet evals / step | UNet calls / step | peak GB | estimate GB |", "|---|---|---|---|---|---|"]
    for r in record["runs"]:
        if "failed" in r:
            lines.append(f"| {r['precision']} | failed: {' '.join(r['failed'])} | | | | |")
            continue
        estimate = f"{r['estimate_bytes'] / 1e9:.2f}" if r["estimate_bytes"] else "-"
        lines.append(f"| {r['label']} | {r['seconds_per_step']:.2f} | {r['unet_evals_per_step']:.1f} | {r['unet_calls_per_step']:.1f} | "
                     f"{r['peak_bytes'] / 1e9:.2f} | {estimate} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "gpu_check.json")
    ap.add_argument("--table", action="store_true", help="print the recorded table and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text()) if args.json.exists() else {}))
        return
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to PyTorch here; nothing to check (run it on a machine with an NVIDIA GPU)")
        return
    from release_layouts import sd15, write_streamed

    from erase.engine.device import native_bf16

    device = torch.device("cuda")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_precision.py",
                            *(["tests/test_data_parallel.py"] if torch.cuda.device_count() > 1 else [])],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "ERASE_TEST_DEVICE": "cuda", "HF_HUB_OFFLINE": "1"})
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"precision tests on {torch.cuda.get_device_name(device)}: {summary}", flush=True)
    model, out = args.dir / "erase-gpu-check-sd15.safetensors", args.dir / "erase-gpu-check-erased.safetensors"
    write_streamed(sd15(), model)
    runs = [erasure(model, out, "auto", args.steps)]
    if native_bf16(device):
        runs.append(erasure(model, out, "fp16", args.steps))
    record = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda, "tests": summary,
              "steps": args.steps, "runs": runs}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    for p in (model, out, out.with_name(out.stem + ".report.json")):
        p.unlink(missing_ok=True)
    print(table(record))
    if tests.returncode or any("failed" in r for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
