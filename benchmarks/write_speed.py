"""Surgical-write cost vs a plain copy, on a random SD1.5-sized fp16 single file.

    python benchmarks/write_speed.py [--dir /tmp] [--repeats 3]

Builds a file with the full key set of the SD 1.5 release (tests/release_layouts.py: UNet, VAE, text
encoder, position ids, DDPM buffers, EMA scalars), random fp16 contents (~2 GB), then times, alternately:
`cp` (shutil.copyfile) and erase's writer replacing every attn2 tensor.
Prints both and their ratio (the writer should cost about what copying costs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
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
    print(f"file: {len(ckpt.tensors)} tensors, {size / 1e9:.2f} GB fp16 (SD 1.5 layout); replaced {len(attn2)} attn2 tensors "
          f"({sum(new[k].numel() for k in attn2) / 1e6:.1f} M params)")
    print(f"copy (shutil.copyfile + fsync): median {cp:.2f} s over {args.repeats}")
    print(f"erase surgical write (+ fsync):  median {wr:.2f} s over {args.repeats}")
    print(f"ratio write / copy: {wr / cp:.2f}")


if __name__ == "__main__":
    main()
