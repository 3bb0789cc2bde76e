"""The forward process a model was trained on: a clean latent, noise and a timestep give the noised latent and what the
model should predict there. Concept Ablation, HFI's token inversion and UnlearnDiffAtk all train or attack through this
pair; it lives here once, so that a family with another forward process (flow matching: a straight line from the latent
to the noise, the velocity as target) brings its own in one place instead of three."""

from __future__ import annotations

import torch


class DiffusionNoise:
    """A DDPM schedule's forward process for epsilon- or v-prediction models: diffusers' scheduler does the maths
    (`add_noise`, `get_velocity`); this picks the target the model's prediction type asks for."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler  # built for the model: its config carries the family's prediction type
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, the model's target at z_t): the noise, or v = sqrt(a) noise - sqrt(1 - a) z0 for a v-prediction model."""
        z_t = self.scheduler.add_noise(z0, noise, t)
        return z_t, (self.scheduler.get_velocity(z0, noise, t) if self.v_prediction else noise)
