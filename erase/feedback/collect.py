"""Images for feedback: the model to be cleaned draws prompts with the concept (HFI's first step).

    DIR/collection.json   what was sampled: concept, model path and sha256, sampler, steps, size, guidance
    DIR/manifest.jsonl    one line per image: {"image", "prompt", "seed", "guidance", "negative"}
    DIR/images/*.png      the images, with A1111-style parameters in the PNG

Every image can be regenerated from those two files (`regenerate`), so a labelled folder stays evidence of
what the model drew, not a pile of pictures.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from erase.errors import UsageError
from erase.generate import GenSettings, ImageGenerator, Job, image_name, save_png

MANIFEST = "manifest.jsonl"
COLLECTION = "collection.json"
IMAGES = "images"


def collection_prompts(concept: str, prompts: list[str] | None, vocabulary: str | None, metadata: dict[str, str]) -> list[str]:
    """The prompts to draw: the user's, or the concept in the vocabulary's templates (as `erase run --expand`)."""
    from erase.vocabulary import default_vocabulary, expand, load_vocabulary

    if prompts:
        return list(dict.fromkeys(prompts))
    return expand(concept, load_vocabulary(vocabulary or default_vocabulary(metadata)))


def collect(model_path: Path, concept: str, out: Path, *, n: int, settings: GenSettings, seed: int = 0,
            prompts: list[str] | None = None, vocabulary: str | None = None, prediction_type: str | None = None, progress=None,
            text_encoders: Path | None = None) -> dict:
    """Draw `n` images, cycling through the prompts with seeds seed, seed+1, ...; write them and the manifest.
    `text_encoders`: an SD3 / FLUX.1 file's diffusers folder (erase.transformer_model), recorded for regenerate and invert."""
    from erase.checkpoint.write import sha256_file
    from erase.transformer_model import open_any_model

    if not concept.strip():
        raise UsageError("--concept must not be empty")
    if n < 1:
        raise UsageError("--n must be >= 1")
    if (out / MANIFEST).exists():
        raise UsageError(f"{out} already holds a collection ({MANIFEST}); choose another --out")
    settings.validate()
    model = open_any_model(model_path, prediction_type, text_encoders, command="feedback collect")
    settings = settings.for_model(model)
    texts = collection_prompts(concept, prompts, vocabulary, model.ckpt.metadata)
    jobs = [Job(texts[i % len(texts)], seed + i, settings.guidance, settings.negative) for i in range(n)]
    gen = ImageGenerator(model, settings)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    model_hash = sha256_file(model_path)
    rows = []

    def save(job: Job, image) -> None:
        name = image_name(len(rows), job)
        save_png(image, out / IMAGES / name, gen.parameters_text(job, model_hash))
        rows.append({"image": name, **asdict(job)})
        if progress:
            progress()

    gen.generate(jobs, on_image=save)
    info = {"concept": concept, "model": str(model_path), "model_sha256": model_hash,
            "text_encoders": str(text_encoders) if text_encoders else None, "steps": settings.steps,
            "scheduler": settings.scheduler, "size": gen.size, "guidance": settings.guidance, "negative": settings.negative,
            "precision": settings.precision, "batch": settings.batch, "embeddings": [str(p) for p in settings.embeddings], "prompts": texts, "images": len(rows)}
    (out / COLLECTION).write_text(json.dumps(info, indent=2))
    tmp = out / (MANIFEST + ".tmp")  # the manifest appears whole or not at all: it marks a finished collection
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / MANIFEST)
    return {**info, "out": str(out)}


def read_collection(folder: Path) -> tuple[dict, list[dict]]:
    """(collection.json, manifest rows) of a folder written by `collect`; a usage error otherwise."""
    if not (folder / MANIFEST).exists() or not (folder / COLLECTION).exists():
        raise UsageError(f"{folder} is not a feedback collection (no {MANIFEST}); make one with `erase feedback collect`")
    info = json.loads((folder / COLLECTION).read_text())
    rows = [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines() if line.strip()]
    return info, rows


def regenerate(folder: Path, names: list[str], model_path: Path | None = None, device: str = "cpu"):
    """Redraw images of a collection from its manifest alone (the recorded model unless `model_path`). Each image is
    redrawn in the batch it was drawn in: a different batch changes the float reductions, and so a few pixels."""
    from erase.transformer_model import open_any_model

    info, rows = read_collection(folder)
    index = {r["image"]: i for i, r in enumerate(rows)}
    missing = [n for n in names if n not in index]
    if missing:
        raise UsageError(f"{folder}: no image {missing[0]} in the manifest")
    settings = GenSettings(steps=info["steps"], guidance=info["guidance"], size=info["size"], scheduler=info["scheduler"],
                           negative=info["negative"], batch=info["batch"], device=device, precision=info["precision"],
                           embeddings=tuple(Path(p) for p in info["embeddings"]))
    folder_text = Path(info["text_encoders"]) if info.get("text_encoders") else None
    gen = ImageGenerator(open_any_model(model_path or Path(info["model"]), text_encoders=folder_text, command="feedback"), settings)
    drawn = {}
    for b in sorted({index[n] // settings.batch for n in names}):
        batch = rows[b * settings.batch : (b + 1) * settings.batch]
        images = gen.generate([Job(r["prompt"], r["seed"], r["guidance"], r["negative"]) for r in batch])
        drawn.update({r["image"]: im for r, im in zip(batch, images)})
    return [drawn[n] for n in names]
