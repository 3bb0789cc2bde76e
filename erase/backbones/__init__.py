"""What differs between model families, one file per family (DESIGN.md §2: the backbone interface, built piece by piece).

Built so far: the one forward of the transformer families (SD3 / SD3.5, FLUX.1), which `erase.engine.sampling.predict`
calls in place of the UNet's; the trainable sets' rules per family (unet.py, mmdit.py); which families are
guidance-distilled. SD 1.x / 2.x / SDXL still load through `erase.models` and UCE edits attn2 by name (erase.methods.uce):
the next pieces to move here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from erase.checkpoint.transformer_files import TRANSFORMER_CLASSES

DISTILLED = ("flux",)  # families that sample with one forward per step, without classifier-free guidance


def guidance_distilled(model) -> bool:
    """FLUX.1: one forward per sampling step, on the prompt alone (dev takes the guidance scale as an input; schnell needs
    none); classifier-free guidance's unconditional half is not part of how it samples."""
    return TRANSFORMER_CLASSES.get(type(model).__name__) in DISTILLED


def transformer_forward(model) -> Callable | None:
    """The family forward for a diffusers transformer (`forward(call, z, t, cond, config)`), None for a UNet."""
    family = TRANSFORMER_CLASSES.get(type(model).__name__)
    if family is None:
        return None
    return importlib.import_module(f"erase.backbones.{family}").forward
