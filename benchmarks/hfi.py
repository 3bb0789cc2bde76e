"""HFI in the shapes world: erase what a labeller flags ("red circles"), not what a word names ("circle").

    python benchmarks/hfi.py [--json benchmarks/hfi.json] [--only ROW ...] [--seeds 8]

The loop, with erase's own code path at every step (the same functions as `erase feedback ...` and `erase run`):
  1. collect 192 images of prompts that name no colour ("a circle", "circle", "a photo of a circle")
  2. label them with the shapes detector as a simulated labeller: binary `shapes:red-circle`, and separately in
     rank mode (groups of 5 ordered by the detector's confidence; Bradley-Terry rewards)
  3. invert: one token <flagged> initialised from "circle" (500 steps, lr 5e-3, 4 images/step)
  4. erase the token with UCE and SDD (Beta(3, 3) timesteps, as HFI), beside erasing the nearest text
     concept "red circle" with the same method and settings
  5. measure every model on the same prompts and seeds: "a {colour} {shape}" and "a {shape}" (8 seeds per
     colour each), with the detector naming shape and colour.

Columns: red circles drawn for "a red circle" and for "a circle" (the flagged concept, as named and as the model
picks it); circles of the other five colours; red squares, triangles, ... (the flagged colour elsewhere); every
other prompt's shape accuracy; colour fidelity; and, for the token rows, what the token itself draws ("a <flagged>").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLLECT_PROMPTS = ["a circle", "circle", "a photo of a circle"]
TOKEN = "<flagged>"
SDD = {"steps": 300, "lr": 1e-4, "ema_decay": 0.995}  # benchmarks/shapes.py's scaling of the reference


def measure_row(model: Path, embedding: Path | None, seeds: int) -> dict:
    from erase.evaluate.shapes_world import Protocol, measure
    from erase.shapes import COLOURS, SHAPES

    r = measure(model, ["circle"], Protocol(seeds=seeds, templates=("a {colour} {shape}", "a {shape}")))
    others = [s for s in SHAPES if s != "circle"]
    row = {
        "red circle | a red circle": r["cells"]["circle"]["red"],
        "red circle | a circle": r["uncoloured"]["circle"]["red"],
        "other circles": sum(r["cells"]["circle"][c] for c in COLOURS if c != "red") / 5,
        "red other shapes": sum(r["cells"][s]["red"] for s in others) / len(others),
        "other shapes": sum(r["per_shape"][s]["accuracy"] for s in others) / len(others),
        "colour fidelity": sum(r["per_colour"][c]["colour_fidelity"] for c in COLOURS) / len(COLOURS),
        "per_shape": {s: r["per_shape"][s]["accuracy"] for s in SHAPES},
        "cells": r["cells"], "uncoloured": r["uncoloured"],
    }
    if embedding is not None:  # what the learned token itself draws
        from erase.generate import GenSettings, ImageGenerator, Job
        from erase.models import open_model
        from erase.shapes import ShapesDetector, to_tensor

        gen = ImageGenerator(open_model(model), GenSettings(steps=20, guidance=5.0, batch=64, device="cpu", embeddings=(embedding,)))
        labels = ShapesDetector().classify(to_tensor(gen.generate([Job(f"a {TOKEN}", 1000 + k, 5.0) for k in range(6 * seeds)])))
        row["token draws red circles"] = sum(s == "circle" and c == "red" for s, c, _ in labels) / len(labels)
    return row


def build_token(base: Path, work: Path, mode: str) -> tuple[Path, dict]:
    """collect -> auto-label -> invert; the token file and what each stage took."""
    from erase.feedback.autolabel import auto_label
    from erase.feedback.collect import collect
    from erase.feedback.invert import InvertConfig, invert
    from erase.generate import GenSettings

    folder = work / f"collection-{mode}"
    t0 = time.perf_counter()
    if not (folder / "manifest.jsonl").exists():
        collect(base, "circle", folder, n=192, settings=GenSettings(steps=20, guidance=5.0, batch=64, device="cpu"), prompts=COLLECT_PROMPTS)
    t1 = time.perf_counter()
    labelled = auto_label(folder, "shapes:red-circle", mode)
    t2 = time.perf_counter()
    out = work / f"flagged-{mode}.safetensors"
    report = invert(folder, base, out, InvertConfig(token=TOKEN, init="circle", device="cpu"), force=True)
    info = {"collect_seconds": t1 - t0, "label_seconds": t2 - t1, "invert_seconds": report["seconds"], "labels": labelled,
            "images_used": report["images_used"], "final_loss": report["final_loss_mean_last_50"]}
    return out, info


def erase(base: Path, work: Path, name: str, concepts: list[str], method: str, embedding: Path | None, **extra) -> Path:
    from rich.console import Console

    from erase.engine.trainer import TrainConfig
    from erase.run import RunOptions, erase_concepts

    out = work / f"{name}.safetensors"
    train = TrainConfig(**SDD) if method == "sdd" else TrainConfig()
    # the SDD rows were measured with erase run's SDD defaults of before issue 36: pinned, so the record reproduces
    before = dict(train_set="xattn", preserve_per_step=2, preserve_paired=False, adversarial=None) if method == "sdd" else {}
    extra = {"trajectories": "teacher", "sample_on": "joined", **extra} if method == "sdd" else extra
    erase_concepts(RunOptions(model=base, concepts=concepts, out=out, force=True, resolution=32, device="cpu", method=method, train=train,
                              method_config=extra, embeddings=[embedding] if embedding else [], **before), Console(quiet=True),
                   progress=False)
    return out


ROWS = {  # name -> (method, concepts, which token (None: a text concept), method options)
    "uce red circle (text)": ("uce", ["red circle"], None, {}),
    "uce <flagged> (HFI, binary labels)": ("uce", [TOKEN], "binary", {}),
    "uce <flagged> (HFI, rank labels)": ("uce", [TOKEN], "rank", {}),
    "sdd red circle (text)": ("sdd", ["red circle"], None, {"reuse": 8}),
    "sdd <flagged> (HFI, binary labels, Beta(3,3))": ("sdd", [TOKEN], "binary", {"reuse": 8, "timesteps": "beta"}),
}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "shapes" / "shapes-sd.safetensors")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "hfi.json")
    parser.add_argument("--seeds", type=int, default=8, help="images per (shape, colour) prompt and wording")
    parser.add_argument("--only", nargs="*", help="rows to (re)run; the others are kept from --json")
    parser.add_argument("--work", type=Path, help="keep collections, tokens and models here (default: a temp folder)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    results = json.loads(args.json.read_text()) if args.json.exists() else {"rows": {}, "tokens": {}}
    work = args.work or Path(tempfile.mkdtemp(prefix="erase-hfi-"))
    work.mkdir(parents=True, exist_ok=True)
    todo = ["base", *ROWS] if not args.only else args.only
    tokens: dict[str, Path] = {}
    for mode in dict.fromkeys(["binary", *(ROWS[n][2] for n in todo if n in ROWS and ROWS[n][2])]):  # base too: what the token draws
        tokens[mode], results["tokens"][mode] = build_token(args.model, work, mode)
        print(f"token from {mode} labels: {results['tokens'][mode]}", flush=True)
    for name in todo:
        t0 = time.perf_counter()
        if name == "base":
            model, emb = args.model, None
        else:
            method, concepts, mode, extra = ROWS[name]
            emb = None
            if mode is not None:
                emb = tokens[mode]
            model = erase(args.model, work, name.split(" (")[0].replace(" ", "-").replace("<", "").replace(">", "") + (f"-{mode}" if mode else ""),
                          concepts, method, emb, **extra)
        row = measure_row(model, emb or tokens["binary"], args.seeds)
        row["seconds"] = time.perf_counter() - t0
        results["rows"][name] = row
        args.json.write_text(json.dumps(results, indent=2))
        print(name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, flush=True)
    print(table(results))


COLUMNS = ("red circle | a red circle", "red circle | a circle", "other circles", "red other shapes", "other shapes", "colour fidelity",
           "token draws red circles")


def table(results: dict) -> str:
    lines = ["| row | " + " | ".join(c.replace("|", "\\|") for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name.replace('<', chr(92) + '<').replace('>', chr(92) + '>')} | "
                     + " | ".join(f"{row[c]:.2f}" if c in row else "-" for c in COLUMNS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
