"""What several commands share: argument types, help panels, prompt and sampling helpers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from erase.cli.app import err_console

ModelPath = Annotated[Path, typer.Argument(help="Checkpoint: .safetensors / .ckpt single file, or a diffusers folder.", show_default=False)]
TextEncodersOption = Annotated[Optional[Path], typer.Option(
    "--text-encoders", help="SD3 / FLUX.1: a diffusers folder of the family whose text encoders (T5 with its tokenizer), VAE and "
    "scheduler are used instead of the file's or folder's own (FLUX.1 files need one).")]
GUIDANCE_DEFAULTS = "default by family: 7.5 on Stable Diffusion, 7 on SD3, 3.5 on FLUX.1-dev, 1 on FLUX.1-schnell"
PredictionType = Annotated[Optional[str], typer.Option("--prediction-type", help="Override the detected prediction type: epsilon or v_prediction.")]

ENGINE = "Engine"
FILES = "Files"
SAMPLING = "Sampling"
PROMPTS = "Prompts"


class Safety(str, Enum):
    weak = "sld-weak"
    medium = "sld-medium"
    strong = "sld-strong"
    max = "sld-max"



XformersOption = Annotated[bool, typer.Option("--xformers", help="xformers attention in the UNet (CUDA, with the xformers package "
                                              "installed: an error otherwise).", rich_help_panel=ENGINE)]


def gen_settings(steps, guidance, size, scheduler, negative, batch, device, precision, safety=None, safety_concept=None, embeddings=None,
                 xformers=False):
    from erase.generate import SLD_CONCEPT, GenSettings

    return GenSettings(steps=steps, guidance=guidance, size=size, scheduler=scheduler.value, negative=negative, batch=batch,
                       device=device.value, precision=precision.value, safety=safety.value if safety else None,
                       safety_concept=safety_concept or SLD_CONCEPT, embeddings=tuple(embeddings or ()), xformers=xformers)


def prompt_specs(prompt: list[str] | None, prompts: Optional[str], category: Optional[str] = None, limit: Optional[int] = None):
    from erase.errors import UsageError
    from erase.prompts import PromptSpec, load_prompts

    if prompt and prompts:
        raise UsageError("give --prompt or --prompts, not both")
    if prompts:
        return load_prompts(prompts, category=category, limit=limit)
    if not prompt or any(not p.strip() for p in prompt):
        raise UsageError("give at least one non-empty --prompt, or --prompts FILE")
    return [PromptSpec(p.strip()) for p in prompt][:limit]



def warn_truncated(long: dict[str, int]) -> None:
    from erase.models import truncation_notes

    for note in truncation_notes(long):
        err_console.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)


