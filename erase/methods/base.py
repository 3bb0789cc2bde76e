"""What every trained method holds: the engine it samples and trains with."""

from __future__ import annotations

import torch

from erase.engine.params import trained_params
from erase.engine.sampling import EvalCounter


class TrainedMethod:
    """SDD, ESD and CA: a validated config, the concepts, the one UNet (its trainable subset by name), the scheduler,
    and the run's latent shape, resolution, generator, device and UNet-evaluation counter."""

    def __init__(self, cfg, concepts: list[str], *, unet, scheduler, latent_shape: tuple[int, ...], resolution: int,
                 generator: torch.Generator, device: torch.device, counter: EvalCounter) -> None:
        cfg.validate()
        self.cfg, self.concepts = cfg, concepts
        self.unet, self.scheduler = unet, scheduler
        self.latent_shape, self.resolution = latent_shape, resolution
        self.generator, self.device, self.counter = generator, device, counter
        self.trainable = trained_params(unet)
