"""Vocabularies: the words a model knows, and the prompts people wrap them in.

A vocabulary (TOML, `erase/assets/vocab/`) lists `concepts` (what `--preserve auto` chooses neighbours
from) and `templates` ("{}" is the concept; `{field}` takes each value of `[fields].field`). Erasing and
preserving work on prompts, not bare words: measured on the shapes model, a closed-form edit that erases
"circle" only as a bare word leaves "a red circle" at 0.92, and preserving only bare words lets "a red
square" fall to 0.52 (benchmarks/README.md), so concepts are expanded into the vocabulary's templates.

    vocab = load_vocabulary("builtin:shapes")
    expand("circle", vocab)[:2]        # ['a red circle', 'a green circle']
    without("a red circle", "circle")  # 'a red'
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from erase.errors import UsageError
from erase.prompts import builtin_or_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VOCAB_DIR = Path(__file__).parent / "assets" / "vocab"
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass
class Vocabulary:
    name: str
    concepts: list[str]
    templates: list[str] = field(default_factory=lambda: ["{}"])
    fields: dict[str, list[str]] = field(default_factory=dict)


def load_vocabulary(source: str | Path) -> Vocabulary:
    """`builtin:NAME` or a TOML file with `concepts`, `templates` and optional `[fields]`."""
    path = builtin_or_file(str(source), VOCAB_DIR, ".toml", "vocabulary")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    unknown = set(data) - {"concepts", "templates", "fields"}
    if unknown:
        raise UsageError(f"{path}: unknown keys {sorted(unknown)} (allowed: concepts, templates, fields)")
    vocab = Vocabulary(path.stem, [str(c) for c in data.get("concepts", [])], [str(t) for t in data.get("templates", ["{}"])],
                       {k: [str(x) for x in v] for k, v in data.get("fields", {}).items()})
    for t in vocab.templates:
        if t.count("{}") != 1:
            raise UsageError(f"{path}: template {t!r} must hold the concept as exactly one {{}}")
        missing = set(_FIELD.findall(t)) - set(vocab.fields)
        if missing:
            raise UsageError(f"{path}: template {t!r} uses {sorted(missing)}, not in [fields]")
    return vocab


def default_vocabulary(metadata: dict[str, str]) -> str:
    """The shapes-world model carries its training recipe (`shapes.training`); everything else is general."""
    return "builtin:shapes" if "shapes.training" in metadata else "builtin:general"


def expand(concept: str, vocab: Vocabulary) -> list[str]:
    """Every prompt the vocabulary's templates make of `concept` (each field value in turn), without duplicates."""
    out = []
    for t in vocab.templates:
        names = _FIELD.findall(t)
        for values in itertools.product(*(vocab.fields[n] for n in names)):
            filled = t
            for n, v in zip(names, values):
                filled = filled.replace("{" + n + "}", v, 1)
            out.append(filled.replace("{}", concept))
    return list(dict.fromkeys(out))


def without(prompt: str, concept: str, replacement: str = "") -> str:
    """`prompt` with `concept` replaced (removed by default), spaces tidied: "a red circle" -> "a red"."""
    return " ".join(prompt.replace(concept, replacement, 1).split())


def token_span(tokenizer, prompt: str, concept: str) -> tuple[int, int] | None:
    """Positions [start, end) of `concept`'s tokens in the tokenized `prompt` (CLIP: BOS at 0; T5: no BOS), or None if
    absent."""
    # a tokenizer that sets no length says so with a huge model_max_length, which truncation cannot take
    ids = tokenizer(prompt, truncation=True, max_length=min(tokenizer.model_max_length, 4096)).input_ids
    sub = tokenizer(concept, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return i, i + len(sub)
    return None
