"""Method options, declared once: on each method's config dataclass, with the help text (and flag, choices) in the
field's metadata. `erase run`'s method options, its "does not apply to --method X" check, the jobs and --config keys
and the run summary all come from these declarations, so a new method is its own file and one line in METHODS.

    eta: float = option(1.0, "negative-guidance scale (reference 1.0).")
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass


def option(default, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None, summary: bool = False):
    """A config field that `erase run` offers as `--name` (or `flag`); `summary` fields are printed before training."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "summary": summary})


@dataclass(frozen=True)
class MethodOption:
    name: str  # the config field's name, also the jobs / --config key
    flag: str
    type: type  # int, float or str
    help: str
    choices: tuple[str, ...] | None
    defaults: dict[str, object]  # method -> its default: the methods that own the option
    summary: bool


def method_options(methods: dict) -> dict[str, MethodOption]:
    """Every option the methods declare, by name, with the methods that own it (in METHODS' order)."""
    out: dict[str, MethodOption] = {}
    for method, (_, cfg_cls) in methods.items():
        hints = typing.get_type_hints(cfg_cls)
        for f in dataclasses.fields(cfg_cls):
            if "help" not in f.metadata:  # a field the run command sets another way (expand, preserve_weight)
                continue
            kind = next(a for a in typing.get_args(hints[f.name]) if a is not type(None)) if typing.get_args(hints[f.name]) else hints[f.name]
            seen = out.get(f.name)
            out[f.name] = MethodOption(
                name=f.name, flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"), type=kind,
                help=seen.help if seen else f.metadata["help"], choices=f.metadata["choices"],
                defaults={**(seen.defaults if seen else {}), method: f.default}, summary=f.metadata["summary"])
    return out
