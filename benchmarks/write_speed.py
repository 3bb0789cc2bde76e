"""Surgical-write cost vs a plain copy, on a random SD1.5-sized fp16 single file.

    python benchmarks/write_speed.py [--dir /tmp] [--repeats 3]

Builds a file with the real SD 1.5 tensor names and shapes (UNet, VAE, text encoder from the
carried configs, on the meta device: no weights needed), random fp16 contents (~2 GB), then
times, alternately: `cp` (shutil.copyfile) and erase's writer replacing every attn2 tensor.
Prints both and their ratio (the writer should cost about what copying costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import time
from pathlib import Path

import numpy as np
import torch


def sd15_layout() -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.checkpoint.export import clip_to_ldm, unet_to_ldm, vae_to_ldm
    from erase.checkpoint.model_config import CONFIG_ROOT

    cfg = lambda c: {k: v for k, v in json.loads((CONFIG_ROOT / "sd1" / c / "config.json").read_text()).items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        vae = AutoencoderKL.from_config(cfg("vae"))
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg("text_encoder").items() if k != "architectures"}))
    shapes = {}
    shapes.update({k: tuple(v.shape) for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()})
    shapes.update({k: tuple(v.shape) for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
    te = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    shapes.update({k: tuple(v.shape) for k, v in clip_to_ldm(te, "sd1").items()})
    return shapes


def write_random_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        left = offset
        while left:
            chunk = min(left, 64 << 20)
            f.write((rng.standard_normal(chunk // 2, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
            left -= chunk
    return offset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from erase.checkpoint.formats import open_checkpoint
    from erase.checkpoint.write import write_safetensors

    src = args.dir / "erase-bench-sd15.safetensors"
    shapes = sd15_layout()
    size = write_random_file(src, shapes)
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
    print(f"file: {len(shapes)} tensors, {size / 1e9:.2f} GB fp16 (SD 1.5 layout); replaced {len(attn2)} attn2 tensors "
          f"({sum(new[k].numel() for k in attn2) / 1e6:.1f} M params)")
    print(f"copy (shutil.copyfile + fsync): median {cp:.2f} s over {args.repeats}")
    print(f"erase surgical write (+ fsync):  median {wr:.2f} s over {args.repeats}")
    print(f"ratio write / copy: {wr / cp:.2f}")


if __name__ == "__main__":
    main()
