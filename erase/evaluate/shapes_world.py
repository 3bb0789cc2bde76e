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
from erase.shapes import COLOURS, NONE, SHAPES, ShapesDetector, to_tensor
from erase.transformer_model import open_any_model


@dataclass
class Protocol:
    seeds: int = 16  # images per (shape, colour) prompt
    unconditional: int = 96  # images for the empty prompt
    steps: int = 20  # DDIM steps
    guidance: float = 5.0  # CFG scale
    batch: int = 64
    first_seed: int = 1000
    templates: tuple[str, ...] = ("a {colour} {shape}",)  # prompt wordings; one without {colour} draws 6 x `seeds` images too


# The targets an erasure of one shape is held to (issue 27): the target's presence on its own prompts at most the base's
# unconditional rate of it + 5 points (what the base draws unasked); every other shape keeps 90 % of its base accuracy;
# colour fidelity 0.95; Concept Ablation's circle prompts draw the anchor 0.6 of the time.
PRESENCE_MARGIN, KEPT_MIN, COLOUR_MIN, ANCHOR_MIN = 0.05, 0.90, 0.95, 0.60


def verdict(metrics: dict, base: dict, anchor: str | None = None) -> dict:
    """Which targets `metrics` (a `measure` result) meets against `base` (the input model measured the same way). Each
    erased shape is held to its own bound: its presence on its own prompts at most the base's unconditional rate of it
    plus the margin (`presence_max`, by shape)."""
    targets = metrics["targets"]
    # a shape the base never draws on its own prompts (the shapes-world FLUX.1 draws squares as circles) has nothing to keep
    kept = {s: v["accuracy"] / base["per_shape"][s]["accuracy"] for s, v in metrics["per_shape"].items()
            if s not in targets and base["per_shape"][s]["accuracy"] > 0}
    colour = min(v["colour_fidelity"] for v in metrics["per_shape"].values())
    eps = 1e-9  # rates are counts over counts: 36/48 over 40/48 is 90 %, which floats make 0.8999...
    presence_max = {t: base["unconditional"][t] + PRESENCE_MARGIN for t in targets}
    met = {"presence": all(metrics["per_shape"][t]["accuracy"] <= presence_max[t] + eps for t in targets),
           "kept": min(kept.values()) >= KEPT_MIN - eps, "colour": colour >= COLOUR_MIN - eps}
    if anchor:
        met["anchor"] = metrics["target_drawn"].get(anchor, 0.0) >= ANCHOR_MIN - eps
    return {"met": met, "all": all(met.values()), "presence_max": presence_max, "kept_min": min(kept.values()), "kept_worst": min(kept, key=kept.get),
            "colour_min": colour}


UNSEEN_TEMPLATES = (  # wordings the shapes model never saw in training, for "does it hold on other prompts?"
    "an illustration of a {colour} {shape}",
    "a small {colour} {shape}",
    "a {colour} {shape} icon",
    "one {colour} {shape}",
)


def protocol_jobs(protocol: Protocol) -> list[tuple[Job, str, str | None, str]]:
    """(job, shape asked for, colour asked for or None, wording) for every prompted image of the protocol. A wording
    without {colour} draws `seeds` images per colour as well, each with its own seed (the same prompt and seed six
    times would be one image counted six times)."""
    return [(Job(t.format(colour=colour, shape=shape), protocol.first_seed + k + (0 if "{colour}" in t else c * protocol.seeds),
                 protocol.guidance), shape, colour if "{colour}" in t else None, t)
            for t in protocol.templates for shape in SHAPES for c, colour in enumerate(COLOURS) for k in range(protocol.seeds)]


def measure(model_path: Path, targets: list[str], protocol: Protocol = Protocol(), *, safety: str | None = None,
            safety_concept: str = "", keep_images: int = 0, embeddings: tuple[Path, ...] = (), on_batch=None,
            text_encoders: Path | None = None) -> dict:
    """Draw the protocol's images from `model_path` and classify them; `on_batch(images_done, images_total)` after each batch.
    `text_encoders`: the diffusers folder a transformer-only file (the shapes-world FLUX.1) draws with."""
    settings = GenSettings(steps=protocol.steps, guidance=protocol.guidance, batch=protocol.batch, device="cpu",
                           safety=safety, safety_concept=safety_concept or "x", embeddings=embeddings)
    gen = ImageGenerator(open_any_model(model_path, text_encoders=text_encoders), settings)
    detector = ShapesDetector()
    # (job, shape asked for, colour asked for or None, template)
    asked = protocol_jobs(protocol)
    jobs = [a[0] for a in asked] + [Job("", protocol.first_seed + k, protocol.guidance) for k in range(protocol.unconditional)]
    labels, kept = [], {}
    for i in range(0, len(jobs), protocol.batch):
        chunk = jobs[i : i + protocol.batch]
        images = gen.decode(gen.latents(chunk))
        labels += detector.classify(to_tensor(images))
        if on_batch is not None:
            on_batch(len(labels), len(jobs))
        for job, im in zip(chunk, images):
            if len(kept.setdefault(job.prompt, [])) < keep_images:
                kept[job.prompt].append(im)
    result: dict = {"targets": targets, "per_shape": {}, "images_per_prompt": protocol.seeds, "templates": list(protocol.templates)}
    rows = [(shape, colour, t, lab) for (_, shape, colour, t), lab in zip(asked, labels)]
    for shape in SHAPES:
        mine = [r for r in rows if r[0] == shape]
        hits = sum(lab[0] == shape for *_, lab in mine)
        coloured = [(c, lab) for _, c, _, lab in mine if c is not None]
        result["per_shape"][shape] = {"accuracy": hits / len(mine), "ci95": wilson(hits, len(mine)), "n": len(mine),
                                      "colour_fidelity": sum(lab[1] == c for c, lab in coloured) / max(1, len(coloured))}
    result["per_colour"] = {}
    for colour in COLOURS:
        mine = [r for r in rows if r[1] == colour]
        result["per_colour"][colour] = {"colour_fidelity": sum(lab[1] == colour for *_, lab in mine) / len(mine),
                                        "shape_accuracy": sum(lab[0] == s for s, *_, lab in mine) / len(mine), "n": len(mine)}
    # what each prompt draws, shape and colour together: "a red circle" -> red circles (HFI's flagged concepts are such cells)
    result["cells"] = {shape: {colour: sum(lab[0] == shape and lab[1] == colour for s, c, _, lab in rows if s == shape and c == colour) /
                               max(1, sum(1 for s, c, *_ in rows if s == shape and c == colour)) for colour in COLOURS} for shape in SHAPES}
    bare = [(s, lab) for s, c, _, lab in rows if c is None]  # prompts that name no colour: which colours does the model pick?
    if bare:
        result["uncoloured"] = {shape: {colour: sum(lab[0] == shape and lab[1] == colour for s, lab in bare if s == shape) /
                                        sum(1 for s, _ in bare if s == shape) for colour in COLOURS} for shape in SHAPES}
    if len(protocol.templates) > 1:  # accuracy per wording and shape
        result["per_template"] = {t: {shape: sum(lab[0] == shape for s, _, tt, lab in rows if s == shape and tt == t) /
                                      sum(1 for s, _, tt, _ in rows if s == shape and tt == t) for shape in SHAPES}
                                  for t in protocol.templates}
    uncond = [lab[0] for j, lab in zip(jobs, labels) if j.prompt == ""]
    result["unconditional"] = {s: uncond.count(s) / len(uncond) for s in (*SHAPES, NONE)}
    target_hits = sum(result["per_shape"][t]["accuracy"] * result["per_shape"][t]["n"] for t in targets)
    target_n = sum(result["per_shape"][t]["n"] for t in targets)
    result["target_presence"] = target_hits / target_n
    result["target_presence_ci95"] = wilson(round(target_hits), target_n)
    result["unconditional_rate"] = sum(result["unconditional"][t] for t in targets)
    result["others_accuracy"] = {s: result["per_shape"][s]["accuracy"] for s in SHAPES if s not in targets}
    result["target_colour_fidelity"] = sum(result["per_shape"][t]["colour_fidelity"] for t in targets) / len(targets)
    drawn = [lab[0] for shape, _, _, lab in rows if shape in targets]  # what the target's prompts draw now
    result["target_drawn"] = {s: drawn.count(s) / len(drawn) for s in (*SHAPES, NONE)}
    result["samples"] = kept
    return result
