"""Scale-out: what `--batch-size` and data parallel cost and buy, measured side by side on this machine.

    python benchmarks/scale.py [--steps 24] [--json benchmarks/scale.json]

Rows (the shapes model, erase run's SDD defaults of before issue 36, pinned: --preserve auto with 2 retain prompts per
step, the EMA teacher's latents, reuse 8, as in benchmarks/shapes.py's sdd-teacher row): batch 1, 2, 4 on one process (1 thread, then 2 threads), and 2 processes of batch 1 under
torchrun (1 thread each, gloo). Each row is one `erase run`; its report gives seconds per step and UNet evaluations
per step. Samples per second = effective batch / seconds per step.

Communication: a data-parallel step all-reduces the trainable subset's gradients once (fp32). That size is computed
here for SD 1.5 and SDXL from their UNet configs (no weights needed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "shapes" / "shapes-sd.safetensors"
sys.path.insert(0, str(ROOT / "benchmarks"))
from shapes import BEFORE_36_FLAGS  # noqa: E402  (the record was measured with the defaults of before issue 36)


def run_args(model: Path, out: Path, steps: int, batch: int) -> list[str]:
    return ["run", str(model), "--concepts", "circle", "--steps", str(steps), "--lr", "1e-4", "--ema-decay", "0.995", "--reuse", "8",
            "--resolution", "32", "--device", "cpu", "--batch-size", str(batch), "--out", str(out), "--force", "--json", *BEFORE_36_FLAGS]


def one(model: Path, work: Path, steps: int, batch: int, threads: int, processes: int = 1) -> dict:
    out = work / f"b{batch}-t{threads}-p{processes}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "-m", "erase"] \
        if processes > 1 else [sys.executable, "-m", "erase"]
    p = subprocess.run(launcher + run_args(model, out, steps, batch), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stdout[-2000:] + p.stderr[-2000:])
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    return {"batch_per_process": batch, "processes": processes, "threads_per_process": threads, "effective_batch": report["effective_batch"],
            "seconds_per_step": report["seconds_per_step"], "unet_evals_per_step": report["unet_evals_per_step_all_processes"],
            "samples_per_second": report["effective_batch"] / report["seconds_per_step"],
            "unet_evals_per_sample": report["unet_evals_per_step_all_processes"] / report["effective_batch"]}


def gradient_bytes() -> dict:
    """fp32 bytes of the attn2 gradients (erase run's default trainable set) for SD 1.5 and SDXL."""
    import torch
    from diffusers import UNet2DConditionModel

    from erase.checkpoint.model_config import family_config_dir
    from erase.engine.params import select_trainable

    out = {}
    for label, family in (("SD 1.5", "sd1"), ("SDXL", "sdxl")):
        cfg = json.loads((family_config_dir(family) / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg)
        n = sum(p.numel() for p in select_trainable(unet, "xattn").values())
        out[label] = {"trainable_parameters": n, "allreduce_bytes_per_step": 4 * n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per row (a multiple of reuse 8 keeps rows comparable)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "scale.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="erase-scale-"))
    rows = [one(args.model, work, args.steps, b, 1) for b in (1, 2, 4)]
    rows += [one(args.model, work, args.steps, b, 2) for b in (1, 2, 4)]
    rows.append(one(args.model, work, args.steps, 1, 1, processes=2))
    result = {"steps": args.steps, "cpu_count": os.cpu_count(), "rows": rows, "communication": gradient_bytes()}
    args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    for label, c in result["communication"].items():
        print(f"{label}: {c['trainable_parameters'] / 1e6:.1f} M trainable parameters, {c['allreduce_bytes_per_step'] / 2**20:.0f} MiB all-reduced per step")


def table(result: dict) -> str:
    lines = ["| processes x batch | threads each | s/step | UNet evals/step | evals/sample | samples/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        launcher = " (torchrun, gloo)" if r["processes"] > 1 else ""
        lines.append(f"| {r['processes']} x {r['batch_per_process']}{launcher} | {r['threads_per_process']} | {r['seconds_per_step']:.2f} | "
                     f"{r['unet_evals_per_step']:.1f} | {r['unet_evals_per_sample']:.1f} | {r['samples_per_second']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
