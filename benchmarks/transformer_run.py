"""One `erase run` on a release-size SD3.5 medium file (random weights), on this CPU: its peak memory beside the bound.

    python benchmarks/transformer_run.py [--work DIR]     writes benchmarks/transformer_run.json

SD3.5 medium is the largest release whose transformer fits this machine's memory in fp32 (2.5 B parameters, 10 GB; SD3.5
large and FLUX.1 are 8 B and 12 B). The file is written in Stability's layout (erase.checkpoint.transformer_keymap's
release names) from the published config with random bf16 weights, without text encoders; its folder
(`--text-encoders`) holds one-layer CLIP-L and CLIP-G towers of the release widths (the text encoders are freed after
encoding, so their depth does not change what a run holds) and no T5 (SD3's sequence then carries zeros there, as SD3
was trained to run). The run is the smallest SDD erasure that loads and trains what a real one does: the text stream's
keys and values and the pooled embedder (`--train text-kv`), fp32 masters with AdamW and the EMA, one step, at 128
pixels, `--preserve none` (a real run also keeps the trained subset's frozen copy: 0.1 GB here). Recorded: the run's
peak resident memory (the child process's, from the kernel), erase's own estimate of it, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "transformer_run.json"
sys.path.insert(0, str(ROOT))


def meta_model():
    import torch
    from diffusers import SD3Transformer2DModel
    from transformer_memory import RELEASES

    _, config, _ = RELEASES["SD3.5 medium"]
    with torch.device("meta"):
        return SD3Transformer2DModel(**config)


def write_file(path: Path) -> None:
    """The release-size transformer, random bf16 weights, in Stability's layout."""
    import torch
    from safetensors.torch import save_file

    from erase.checkpoint.transformer_keymap import release_state

    model = meta_model()
    config = model.config
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
             for n, p in [*model.named_parameters(), *model.named_buffers()]}
    width = config.num_attention_heads * config.attention_head_dim
    save_file(release_state("sd3", state, width, "model.diffusion_model."), str(path))


def write_folder(folder: Path) -> None:
    """Tokenizers, one-layer CLIP-L / CLIP-G of the release widths, SD3's scheduler: what `--text-encoders` reads."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from erase.models import load_tokenizer
    from erase.transformer_model import SD3_SCHEDULER

    torch.manual_seed(0)
    for sub, width, heads in (("text_encoder", 768, 12), ("text_encoder_2", 1280, 20)):
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                                                   num_attention_heads=heads, projection_dim=width)).save_pretrained(folder / sub)
    load_tokenizer("sdxl", "tokenizer").save_pretrained(folder / "tokenizer")
    load_tokenizer("sdxl", "tokenizer_2").save_pretrained(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None], "transformer": [None, None], "vae": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


RUN = ["-c", "cat", "--preserve", "none", "--train", "text-kv", "--steps", "1", "--sample-steps", "1", "--resolution", "128",
       "--device", "cpu", "--precision", "fp32", "--force"]


def table(record: dict) -> str:
    r = record
    return "\n".join([
        "| file | run | peak resident memory | erase's estimate (weights, training state, activations) | seconds |", "|---|---|---|---|---|",
        f"| {r['release']}, {r['parameters'] / 1e9:.2f} B parameters, random bf16 weights | `erase run {' '.join(r['options'])}` | "
        f"{r['peak_rss_bytes'] / 2**30:.1f} GiB | {r['estimate_bytes'] / 2**30:.1f} GiB | {r['seconds']:.0f} |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="where the 5 GB file and the output go (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="erase-sd35m-"))
    work.mkdir(parents=True, exist_ok=True)
    path, folder = work / "sd3.5_medium-random.safetensors", work / "text-encoders"
    if not path.exists():
        write_file(path)
    if not (folder / "model_index.json").exists():
        write_folder(folder)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "erase", "run", str(path), "--text-encoders", str(folder), *RUN, "-o", str(work / "out.safetensors")],
                   check=True, env={"HF_HUB_OFFLINE": "1", **os.environ})
    seconds = time.perf_counter() - t0
    report = json.loads((work / "out.report.json").read_text())
    model = meta_model()
    record = {"release": "SD3.5 medium", "parameters": sum(t.numel() for t in [*model.parameters(), *model.buffers()]),
              "trainable": report["trainable"], "options": RUN, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
              "estimate_bytes": report["memory_estimate"]["total"], "seconds": seconds, "report_peak_memory": report["peak_memory"],
              "memory_estimate": report["memory_estimate"], "unet_evals_per_step": report["unet_evals_per_step"]}
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
