"""Generate once, score many: images for the model (and the base), detectors, metrics, report."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from erase.checkpoint.write import sha256_file
from erase.evaluate.detectors import make_detector
from erase.evaluate.metrics import LPIPS_SKIPPED, clip_score, preservation
from erase.generate import GenSettings, ImageGenerator, Job, image_name, job_prompts, jobs_for, parameters_text
from erase.models import truncated_prompts
from erase.prompts import load_prompts
from erase.transformer_model import open_any_model

GATE_EXIT_CODE = 3


@dataclass
class EvalOptions:
    model: Path
    prompts: str
    out: Path
    base: Path | None = None
    settings: GenSettings = field(default_factory=GenSettings)
    n: int = 1
    seed: int = 0
    limit: int | None = None
    category: str | None = None
    detector: str = "nudenet"
    threshold: float | None = None  # None: the detector's default (NudeNet 0.6, shapes 0.5)
    targets: list[str] | None = None  # shapes detector: the erased shapes (default: the model's erase.concepts)
    fail_above: float | None = None
    show_flagged: bool = False
    clip_model: Path | None = None
    prediction_type: str | None = None
    text_encoders: Path | None = None  # SD3 / FLUX.1: a diffusers folder of the family (erase.transformer_model)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a rate k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def images_for(path: Path, label: str, jobs: list[Job], opts: EvalOptions, progress=None) -> list[Path]:
    """PNG files for every job; files already in out/<label>/ with the same parameters are reused."""
    model = open_any_model(path, opts.prediction_type, opts.text_encoders)
    folder = opts.out / label
    folder.mkdir(parents=True, exist_ok=True)
    model_hash = sha256_file(path)
    size = opts.settings.size or model.default_resolution
    paths = [folder / image_name(i, j) for i, j in enumerate(jobs)]
    texts = [parameters_text(j, opts.settings, size, path, model_hash) for j in jobs]
    todo = [i for i, (p, t) in enumerate(zip(paths, texts)) if not (p.exists() and Image.open(p).text.get("parameters") == t)]
    if progress:
        progress(len(jobs) - len(todo))
    if todo:
        from erase.generate import save_png

        gen = ImageGenerator(model, opts.settings)
        for start in range(0, len(todo), opts.settings.batch):
            chunk = todo[start : start + opts.settings.batch]
            for i, image in zip(chunk, gen.decode(gen.latents([jobs[i] for i in chunk]))):
                save_png(image, paths[i], texts[i])
                if progress:
                    progress(1)
    return paths


def summarise(scores: list[dict], jobs: list[Job], classes) -> dict:
    flagged = sum(s["flagged"] for s in scores)
    counts = {c: sum(c in s["classes"] for s in scores) for c in classes}
    per_prompt: dict[str, list[int]] = {}
    for s, j in zip(scores, jobs):
        per_prompt.setdefault(j.prompt, []).append(int(s["flagged"]))
    out = {"images": len(scores), "flagged": flagged, "flagged_rate": flagged / max(1, len(scores)),
           "flagged_rate_ci95": wilson(flagged, len(scores)), "class_counts": counts,
           "class_rate_ci95": {c: wilson(k, len(scores)) for c, k in counts.items()},
           "per_prompt_rate": {p: sum(v) / len(v) for p, v in per_prompt.items()},
           "per_prompt": {p: {"flagged": sum(v), "images": len(v), "ci95": wilson(sum(v), len(v))} for p, v in per_prompt.items()}}
    if scores and "shape_correct" in scores[0]:  # shapes world: prompt accuracy and colour fidelity
        by_shape: dict[str, list[bool]] = {}
        for s in scores:
            if s["shape_correct"] is not None:
                by_shape.setdefault(s["prompt_shape"], []).append(s["shape_correct"])
        out["shape_accuracy"] = {k: sum(v) / len(v) for k, v in sorted(by_shape.items())}
        out["shape_accuracy_ci95"] = {k: wilson(sum(v), len(v)) for k, v in sorted(by_shape.items())}
        out["shape_images"] = {k: len(v) for k, v in sorted(by_shape.items())}
        colours = [s["colour_correct"] for s in scores if s["colour_correct"] is not None]
        out["colour_accuracy"] = sum(colours) / len(colours) if colours else None
        out["detected"] = {k: sum(s["shape"] == k for s in scores) for k in sorted({s["shape"] for s in scores})}
    return out


def evaluate(opts: EvalOptions, progress=None) -> dict:
    from erase.run import versions

    opts.settings.validate()
    specs = load_prompts(opts.prompts, category=opts.category, limit=opts.limit)
    model = open_any_model(opts.model, opts.prediction_type, opts.text_encoders)
    opts.settings = opts.settings.for_model(model)  # the base, if any, draws the same jobs
    jobs = jobs_for(specs, opts.settings, n=opts.n, seed=opts.seed)
    long = truncated_prompts(model.family, job_prompts(jobs, opts.settings))
    targets = opts.targets or json.loads(model.ckpt.metadata.get("erase.concepts", "[]")) or None
    det_opts = {"targets": targets}
    if opts.threshold is not None:
        det_opts["threshold"] = opts.threshold
    detector = make_detector(opts.detector, **det_opts)
    runs = {"erased": opts.model} if opts.base is None else {"erased": opts.model, "base": opts.base}
    images, results = {}, {}
    for label, path in runs.items():
        images[label] = images_for(path, label, jobs, opts, progress)
        scores = detector.score(images[label], [j.prompt for j in jobs])
        results[label] = summarise(scores, jobs, detector.classes)
        results[label]["flags"] = [s["flagged"] for s in scores]
    report = {
        "model": str(opts.model), "model_sha256": sha256_file(opts.model),
        "base": str(opts.base) if opts.base else None, "base_sha256": sha256_file(opts.base) if opts.base else None,
        "detector": opts.detector, "threshold": detector.threshold, "targets": targets,
        "prompts": opts.prompts, "category": opts.category, "n": opts.n, "seed": opts.seed, "jobs": len(jobs),
        "settings": {k: [str(p) for p in v] if k == "embeddings" else v for k, v in vars(opts.settings).items() if k != "sld"},
        "erased": results["erased"], "versions": versions(), "truncated_prompts": long,
        "images": {label: [str(p.relative_to(opts.out)) for p in paths] for label, paths in images.items()},
    }
    if opts.base is not None:
        report["base_results"] = results["base"]
        report["delta_flagged_rate"] = results["erased"]["flagged_rate"] - results["base"]["flagged_rate"]
        report["preservation"] = {**preservation(images["base"], images["erased"]), "lpips": LPIPS_SKIPPED,
                                  "clip": clip_score(images["erased"], [j.prompt for j in jobs], opts.clip_model)}
    else:
        report["preservation"] = {"skipped": "no --base given"}
    report["gate"] = None
    if opts.fail_above is not None:
        passed = results["erased"]["flagged_rate"] <= opts.fail_above
        report["gate"] = {"fail_above": opts.fail_above, "passed": passed, "exit_code": 0 if passed else GATE_EXIT_CODE}
    from erase.evaluate.report import write_reports

    write_reports(report, opts.out, jobs, show_flagged=opts.show_flagged)
    return report
