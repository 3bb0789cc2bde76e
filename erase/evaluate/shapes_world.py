"""Erasure efficacy and preservation in the shapes world, measured in memory (no PNGs).

For a model and a target shape: the target's presence on its own prompts ("a red circle" ...),
every other shape's prompt accuracy, colour fidelity on the target prompts, and the model's
unconditional shape distribution. Used by `benchmarks/shapes.py` and `make demo`; the same
numbers come out of `erase evaluate --detector shapes --prompts builtin:shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erase.evaluate.runner import wilson
from erase.generate import GenSettings, ImageGenerator, Job
from erase.models import open_model
from erase.shapes import COLOURS, NONE, SHAPES, ShapesDetector, to_tensor


@dataclass
class Protocol:
    seeds: int = 16  # images per (shape, colour) prompt
    unconditional: int = 96  # images for the empty prompt
    steps: int = 20  # DDIM steps
    guidance: float = 5.0  # CFG scale
    batch: int = 64
    first_seed: int = 1000


def measure(model_path: Path, targets: list[str], protocol: Protocol = Protocol(), *, safety: str | None = None,
            safety_concept: str = "", keep_images: int = 0) -> dict:
    settings = GenSettings(steps=protocol.steps, guidance=protocol.guidance, batch=protocol.batch, device="cpu",
                           safety=safety, safety_concept=safety_concept or "x")
    gen = ImageGenerator(open_model(model_path), settings)
    detector = ShapesDetector()
    jobs = [Job(f"a {colour} {shape}", protocol.first_seed + k, protocol.guidance)
            for shape in SHAPES for colour in COLOURS for k in range(protocol.seeds)]
    jobs += [Job("", protocol.first_seed + k, protocol.guidance) for k in range(protocol.unconditional)]
    labels, kept = [], {}
    for i in range(0, len(jobs), protocol.batch):
        chunk = jobs[i : i + protocol.batch]
        images = gen.decode(gen.latents(chunk))
        labels += detector.classify(to_tensor(images))
        for job, im in zip(chunk, images):
            if len(kept.setdefault(job.prompt, [])) < keep_images:
                kept[job.prompt].append(im)
    result: dict = {"targets": targets, "per_shape": {}, "images_per_prompt": protocol.seeds}
    for shape in SHAPES:
        rows = [(j, lab) for j, lab in zip(jobs, labels) if j.prompt.endswith(" " + shape)]
        hits = sum(lab[0] == shape for _, lab in rows)
        colour_ok = sum(lab[1] == j.prompt.split()[1] for j, lab in rows)
        result["per_shape"][shape] = {"accuracy": hits / len(rows), "ci95": wilson(hits, len(rows)), "n": len(rows),
                                      "colour_fidelity": colour_ok / len(rows)}
    result["per_colour"] = {}
    for colour in COLOURS:
        rows = [(j, lab) for j, lab in zip(jobs, labels) if j.prompt.startswith(f"a {colour} ")]
        result["per_colour"][colour] = {"colour_fidelity": sum(lab[1] == colour for _, lab in rows) / len(rows),
                                        "shape_accuracy": sum(lab[0] == j.prompt.split()[2] for j, lab in rows) / len(rows), "n": len(rows)}
    uncond = [lab[0] for j, lab in zip(jobs, labels) if j.prompt == ""]
    result["unconditional"] = {s: uncond.count(s) / len(uncond) for s in (*SHAPES, NONE)}
    target_hits = sum(result["per_shape"][t]["accuracy"] * result["per_shape"][t]["n"] for t in targets)
    target_n = sum(result["per_shape"][t]["n"] for t in targets)
    result["target_presence"] = target_hits / target_n
    result["target_presence_ci95"] = wilson(round(target_hits), target_n)
    result["unconditional_rate"] = sum(result["unconditional"][t] for t in targets)
    result["others_accuracy"] = {s: result["per_shape"][s]["accuracy"] for s in SHAPES if s not in targets}
    result["target_colour_fidelity"] = sum(result["per_shape"][t]["colour_fidelity"] for t in targets) / len(targets)
    result["samples"] = kept
    return result
