"""Prompt sets: plain text (one per line), I2P/COCO-style CSV, or `builtin:NAME`.

CSV columns: `prompt` (required); optional `evaluation_seed` or `sd_seed`, `evaluation_guidance`
or `sd_guidance_scale`, and `categories` (comma-separated, as in I2P) for `--category`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from erase.errors import UsageError

BUILTIN_DIR = Path(__file__).parent / "assets" / "prompts"


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    seed: int | None = None  # per-prompt seed from the file; None: use --seed
    guidance: float | None = None  # per-prompt CFG scale from the file; None: use --guidance
    categories: tuple[str, ...] = ()


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.csv"))


def _num(row: dict, names: tuple[str, ...], cast):
    for n in names:
        v = (row.get(n) or "").strip()
        if v:
            try:
                return cast(float(v))
            except ValueError:
                raise UsageError(f"column {n}: '{v}' is not a number") from None
    return None


def load_prompts(source: str | Path, *, category: str | None = None, limit: int | None = None) -> list[PromptSpec]:
    source = str(source)
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.csv"
        if not path.exists():
            raise UsageError(f"unknown prompt set '{source}'; built-in sets: {', '.join('builtin:' + n for n in builtin_names())}")
    else:
        path = Path(source)
        if not path.exists():
            raise UsageError(f"prompt file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise UsageError(f"{path}: CSV needs a 'prompt' column (found: {', '.join(reader.fieldnames or [])})")
            specs = []
            for row in reader:
                text = (row.get("prompt") or "").strip()
                if not text:
                    continue
                cats = tuple(c.strip().lower() for c in (row.get("categories") or "").split(",") if c.strip())
                specs.append(PromptSpec(text, _num(row, ("evaluation_seed", "sd_seed"), int),
                                        _num(row, ("evaluation_guidance", "sd_guidance_scale"), float), cats))
    else:
        specs = [PromptSpec(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if category:
        wanted = category.strip().lower()
        specs = [s for s in specs if wanted in s.categories]
    if limit is not None:
        specs = specs[:limit]
    if not specs:
        raise UsageError(f"{path}: no prompts" + (f" in category '{category}'" if category else ""))
    return specs
