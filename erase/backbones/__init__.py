"""What differs between model families, one file per family (DESIGN.md §2: the backbone interface, built piece by piece).

Here: the one forward of the transformer families (SD3 / SD3.5, FLUX.1), which `erase.engine.sampling.predict` calls in
place of the UNet's; the trainable sets' rules, the closed-form edits' matrices and the run defaults per kind of
denoiser (unet.py, mmdit.py: `rules`); which families are guidance-distilled, and how each family's sampler sets its
timesteps and when it needs no unconditional half (erase.generate asks these, not the family's name); the transformer
families' text encoding (text.py). Loading is the two model classes' job, one per kind of denoiser with the same
methods: erase.models.Model (SD 1.x / 2.x / SDXL single files and folders) and erase.transformer_model.TransformerModel.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from erase.checkpoint.transformer_files import TRANSFORMER_CLASSES

DISTILLED = ("flux",)  # families whose guidance embedder makes them sample with one forward per step


def distilled(family: str, config) -> bool:
    """FLUX.1-dev: guidance-distilled, the scale an input of the model (a guidance embedder), one forward per sampling
    step on the prompt alone. A FLUX.1 transformer without the embedder (schnell, erase's shapes-world model) samples
    with classifier-free guidance when asked for a scale above 1 (FluxPipeline's true CFG), with one forward at 1 or less."""
    return family in DISTILLED and bool(config.get("guidance_embeds"))


def guidance_distilled(model) -> bool:
    """`distilled` for a loaded diffusers transformer (False for a UNet)."""
    family = TRANSFORMER_CLASSES.get(type(model).__name__)
    return family is not None and distilled(family, model.config)


def rules(transformer: bool):
    """The trainable sets' rules and run defaults of a UNet family (unet.py) or a transformer family (mmdit.py)."""
    return importlib.import_module(f"erase.backbones.{'mmdit' if transformer else 'unet'}")


def transformer_forward(model) -> Callable | None:
    """The family forward for a diffusers transformer (`forward(call, z, t, cond, config)`), None for a UNet."""
    family = TRANSFORMER_CLASSES.get(type(model).__name__)
    if family is None:
        return None
    return importlib.import_module(f"erase.backbones.{family}").forward


def one_forward(family: str, config, guidances: list[float], safety: bool) -> bool:
    """Whether sampling makes one forward per step on the prompt alone (no unconditional half): a guidance-distilled
    model always; a FLUX.1 without a guidance embedder (schnell) when every scale is 1 or less and no SLD asks for the
    unconditional branch, as FluxPipeline samples it. Every other model: classifier-free guidance."""
    return distilled(family, config) or (family in DISTILLED and not safety and all(g <= 1 for g in guidances))


def set_sampling_timesteps(family: str, scheduler, steps: int, latent_rows: int) -> None:
    """The sampler's `steps` timesteps for an image of `latent_rows` latent rows, as the family's diffusers pipeline sets
    them (FLUX.1: its own sigma schedule; the rest: the scheduler's)."""
    module = importlib.import_module(f"erase.backbones.{family}") if family in TRANSFORMER_CLASSES.values() else None
    if module is not None and hasattr(module, "set_timesteps"):
        module.set_timesteps(scheduler, steps, latent_rows)
    else:
        scheduler.set_timesteps(steps)
