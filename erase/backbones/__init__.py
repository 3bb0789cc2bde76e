"""What differs between model families, one file per family (DESIGN.md §2: the backbone interface, built piece by piece).

Built so far: the one forward of the transformer families (SD3 / SD3.5, FLUX.1), which `erase.engine.sampling.predict`
calls in place of the UNet's. SD 1.x / 2.x / SDXL still go through the UNet path of `predict` and `erase.models`.
"""

from __future__ import annotations

from collections.abc import Callable


def transformer_forward(model) -> Callable | None:
    """The family forward for a diffusers transformer (`forward(call, z, t, cond, config)`), None for a UNet."""
    name = type(model).__name__
    if name == "SD3Transformer2DModel":
        from erase.backbones.sd3 import forward

        return forward
    if name == "FluxTransformer2DModel":
        from erase.backbones.flux import forward

        return forward
    return None
