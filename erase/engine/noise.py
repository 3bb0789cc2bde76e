"""The forward process a model was trained on: a clean latent, noise and a timestep give the noised latent and what the
model should predict there. Concept Ablation, HFI's token inversion and UnlearnDiffAtk all train or attack through this
pair; it lives here once, so that a family with another forward process (flow matching: a straight line from the latent
to the noise, the velocity as target: FlowMatchNoise) brings its own in one place instead of three; `forward_process` picks
by the scheduler the model was built with."""

from __future__ import annotations

import math

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

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The model's timestep input for training timestep `t` (0 .. num_train_timesteps - 1): `t` itself."""
        return t

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, the model's target at z_t): the noise, or v = sqrt(a) noise - sqrt(1 - a) z0 for a v-prediction model."""
        z_t = self.scheduler.add_noise(z0, noise, t)
        return z_t, (self.scheduler.get_velocity(z0, noise, t) if self.v_prediction else noise)


class FlowMatchNoise:
    """Rectified flow (SD3, FLUX.1): z_t = (1 - s) z0 + s noise on a straight line, the velocity noise - z0 as target.
    Training timestep t (0 .. N - 1, as for DiffusionNoise, more noise at higher t) sits at s = (t + 1) / N, shifted as
    diffusers' FlowMatchEulerDiscreteScheduler shifts its training sigmas: s' = shift s / (1 + (shift - 1) s), or, for a
    model with resolution-dependent shifting (FLUX.1), s' = e^mu / (e^mu + 1 / s - 1) with the latent size's `mu`. The
    model takes s' N as its timestep (diffusers' convention: FLUX.1's forward divides it again). Computed from the
    scheduler's config rather than its `sigmas`, which `set_timesteps` replaces when the same scheduler samples."""

    def __init__(self, scheduler, mu: float | None = None) -> None:
        cfg = scheduler.config
        if cfg.get("use_dynamic_shifting") and mu is None:
            raise ValueError("a flow-matching scheduler with dynamic shifting needs the latent size's mu")
        self.scheduler, self.mu = scheduler, mu if cfg.get("use_dynamic_shifting") else None
        self.shift = cfg.get("shift", 1.0)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        s = (t.double() + 1) / self.num_train_timesteps
        if self.mu is not None:
            return (math.exp(self.mu) / (math.exp(self.mu) + (1 / s - 1))).float()
        return (self.shift * s / (1 + (self.shift - 1) * s)).float()

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * self.num_train_timesteps

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(t).to(z0.device, z0.dtype).reshape(-1, *[1] * (z0.dim() - 1))
        return (1 - s) * z0 + s * noise, noise - z0


def is_flow(scheduler) -> bool:
    """A flow-matching scheduler (SD3 / FLUX.1): the model predicts a velocity."""
    return type(scheduler).__name__.startswith("FlowMatch")


def prediction_mse(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """The loss between a prediction and its target, in epsilon terms whatever the model predicts. For eps- and
    v-prediction models that is the plain MSE (as every method has always computed it). For a flow model the velocity
    error is (1 - s)^2 times smaller than the eps error it stands for (eps = z_t + (1 - s) v, so eps_a - eps_b =
    (1 - s)(v_a - v_b)): each sample's squared error is weighted by (1 - s)^2, s = t / N, so that an SDD or ESD run on SD3
    weighs its timesteps as on Stable Diffusion."""
    if not is_flow(scheduler):
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    s = torch.as_tensor(t, device=pred.device, dtype=torch.float32).reshape(-1) / scheduler.config.num_train_timesteps
    w = (1 - s).pow(2).expand(pred.shape[0]).reshape(-1, *[1] * (pred.dim() - 1))
    return (w * (pred.float() - target.float()).pow(2)).mean()


def noise_scheduler(model, resolution: int):
    """The scheduler whose forward process noises `model`'s latents at `resolution` (textual inversion, UnlearnDiffAtk):
    DDPM's on the diffusion families; the family's flow-matching scheduler on SD3 / FLUX.1, with FLUX.1-dev's
    resolution-dependent shift fixed for that size (the training scheduler's)."""
    if model.family.prediction_type == "flow":
        return model.training_scheduler(resolution)
    return model.scheduler("DDPMScheduler")


def forward_process(scheduler, mu: float | None = None) -> DiffusionNoise | FlowMatchNoise:
    """The forward process of the model `scheduler` was built for: flow matching for a flow-matching scheduler."""
    if is_flow(scheduler):
        return FlowMatchNoise(scheduler, mu)
    return DiffusionNoise(scheduler)
