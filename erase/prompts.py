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


def builtin_or_file(source: str, folder: Path, suffix: str, kind: str) -> Path:
    """`builtin:NAME` (a file the package ships in `folder`) or a path; a usage error names what exists."""
    if source.startswith("builtin:"):
        path = folder / f"{source.split(':', 1)[1]}{suffix}"
        if not path.exists():
            names = ", ".join("builtin:" + p.stem for p in sorted(folder.glob(f"*{suffix}")))
            raise UsageError(f"unknown {kind} '{source}'; built-in: {names}")
        return path
    path = Path(source)
    if not path.exists():
        raise UsageError(f"{kind} file {path} does not exist")
    return path


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
    path = builtin_or_file(source, BUILTIN_DIR, ".csv", "prompt set")
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
