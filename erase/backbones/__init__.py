"""What differs between model families, one file per family (DESIGN.md §2: the backbone interface, built piece by piece).

Built so far: the one forward of the transformer families (SD3 / SD3.5, FLUX.1), which `erase.engine.sampling.predict`
calls in place of the UNet's; the trainable sets' rules per family (unet.py, mmdit.py); which families are
guidance-distilled; the matrices a closed-form edit (UCE) changes. SD 1.x / 2.x / SDXL still load through `erase.models`:
the next pieces to move here.
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


def transformer_forward(model) -> Callable | None:
    """The family forward for a diffusers transformer (`forward(call, z, t, cond, config)`), None for a UNet."""
    family = TRANSFORMER_CLASSES.get(type(model).__name__)
    if family is None:
        return None
    return importlib.import_module(f"erase.backbones.{family}").forward
