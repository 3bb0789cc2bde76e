"""Surgical-write cost vs a plain copy, on a random SD1.5-sized fp16 single file.

    python benchmarks/write_speed.py [--dir /tmp] [--repeats 3] [--json benchmarks/write_speed.json]

Builds a file with the full key set of the SD 1.5 release (tests/release_layouts.py: UNet, VAE, text
encoder, position ids, DDPM buffers, EMA scalars), random fp16 contents (~2 GB), then times, alternately:
`cp` (shutil.copyfile) and erase's writer replacing every attn2 tensor.
Writes the record (every time, medians, ratio, torch version, cores) to --json and prints `table(record)`: both
medians and their ratio (the writer should cost about what copying costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def table(record: dict) -> str:
    """The four lines the docs show (in a code block), from a record."""
    r = record
    return "\n".join([
        f"file: {r['tensors']} tensors, {r['file_bytes'] / 1e9:.2f} GB fp16 (SD 1.5 layout); replaced {r['replaced_tensors']} attn2 tensors "
        f"({r['replaced_params'] / 1e6:.1f} M params)",
        f"copy (shutil.copyfile + fsync): median {r['copy_median']:.2f} s over {r['repeats']}",
        f"erase surgical write (+ fsync):  median {r['write_median']:.2f} s over {r['repeats']}",
        f"ratio write / copy: {r['ratio']:.2f}",
    ])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "write_speed.json")
    args = ap.parse_args()
    import torch
    from release_layouts import sd15, write_streamed

    from erase.checkpoint.formats import open_checkpoint
    from erase.checkpoint.write import write_safetensors

    src = args.dir / "erase-bench-sd15.safetensors"
    size = write_streamed(sd15(), src)
    ckpt = open_checkpoint(src)
    attn2 = [k for k in ckpt.keys() if ".attn2." in k]
    new = {k: ckpt.get(k).float() * 1.01 for k in attn2}
    cp_times, write_times = [], []
    for _ in range(args.repeats):
        dst = args.dir / "erase-bench-out.safetensors"
        t = time.perf_counter()
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
        cp_times.append(time.perf_counter() - t)
        dst.unlink()
        t = time.perf_counter()
        write_safetensors(ckpt, dst, new, metadata={"erase.bench": "1"})
        write_times.append(time.perf_counter() - t)
        dst.unlink()
    src.unlink()
    cp, wr = statistics.median(cp_times), statistics.median(write_times)
    record = {"tensors": len(ckpt.tensors), "file_bytes": size, "replaced_tensors": len(attn2),
              "replaced_params": sum(new[k].numel() for k in attn2), "repeats": args.repeats,
              "copy_seconds": cp_times, "write_seconds": write_times, "copy_median": cp, "write_median": wr, "ratio": wr / cp,
              "torch": torch.__version__, "cpu_count": os.cpu_count()}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
