"""What every trained method holds: the engine it samples and trains with."""

from __future__ import annotations

import torch

from erase.engine.params import trained_params
from erase.engine.sampling import EvalCounter


class TrainedMethod:
    """SDD, ESD and CA: a validated config, the concepts, the one UNet (its trainable subset by name), the scheduler,
    and the run's latent shape, resolution, generator, device and UNet-evaluation counter.

    `generators` are the sample streams this process trains on per step (`--batch-size`; under a launcher each rank
    has its own): each stream draws its own noise and timesteps, so a batch of B on one process and B processes of
    batch 1 train on the same samples. The first stream of rank 0 is `generator` itself, so batch 1 on one process is
    the reference run, draw for draw. `batched` says whether the method can take more than one stream."""

    batched = True

    def __init__(self, cfg, concepts: list[str], *, unet, scheduler, latent_shape: tuple[int, ...], resolution: int,
                 generator: torch.Generator, device: torch.device, counter: EvalCounter,
                 generators: list[torch.Generator] | None = None) -> None:
        cfg.validate()
        self.cfg, self.concepts = cfg, concepts
        self.unet, self.scheduler = unet, scheduler
        self.latent_shape, self.resolution = latent_shape, resolution
        self.generator, self.device, self.counter = generator, device, counter
        self.generators = generators or [generator]
        self.trainable = trained_params(unet)
