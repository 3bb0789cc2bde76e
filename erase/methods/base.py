"""The two kinds of method, as explicit base classes: `erase run` asks `issubclass(cls, ClosedFormMethod)` rather than
probing attributes. A trained method holds the engine it samples and trains with; a closed-form one solves."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

from erase.engine.noise import prediction_mse
from erase.engine.params import trained_params
from erase.engine.sampling import EvalCounter, predict


@dataclass
class Draw:
    """One training sample of a trained method: latents, their timesteps, the student's prompt and the target of its
    prediction. `student_loss` scores the student on it; adversarial training (erase.engine.adversarial) scores it again
    with the prompt under attack."""

    z: torch.Tensor
    t: torch.Tensor
    prompt: str
    target: torch.Tensor
    info: dict = field(default_factory=dict)


class ClosedFormMethod(abc.ABC):
    """UCE: `solve(weights)` returns new values for the tensors `edits(name)` selects; no UNet is loaded, nothing trains."""

    name = ""

    @staticmethod
    @abc.abstractmethod
    def edits(name: str, transformer: bool = False) -> bool: ...

    def edited(self, names: list[str], transformer: bool = False) -> list[str]:
        """The parameters among `names` that this edit changes (its options may add some to `edits`')."""
        return [n for n in names if self.edits(n, transformer)]

    @abc.abstractmethod
    def solve(self, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]: ...


class TrainedMethod:
    """SDD, ESD and CA: a validated config, the concepts, the one UNet (its trainable subset by name), the scheduler,
    and the run's latent shape, resolution, generator, device and UNet-evaluation counter.

    `generators` are the sample streams this process trains on per step (`--batch-size`; under a launcher each rank
    has its own): each stream draws its own noise and timesteps, so a batch of B on one process and B processes of
    batch 1 train on the same samples. The first stream of rank 0 is `generator` itself, so batch 1 on one process is
    the reference run, draw for draw. `batched` says whether the method can take more than one stream."""

    batched = True
    adversarial = True  # the loss is one `draw` scored by `student_loss`, so `--adversarial` can attack its prompt
    frozen: dict[str, torch.Tensor] | None = None  # the input's trainable subset, for methods that keep a copy
    last_draw: Draw | None = None  # the step's draw, once taken (the retain term's paired prompts are held on its latents)
    # whose trajectories the retain term (erase.engine.preserve.Retain) samples its latents from: "teacher" (the EMA, or
    # the student at --ema-decay 0) or "frozen" (the input model, whose trajectory then brings each latent's target too)
    retain_sampler = "teacher"

    @staticmethod
    def run_defaults(preserving: bool) -> dict:
        """`erase run` options whose default the method sets: the trained set, retain prompts per step, the paired retain
        prompts and the inner attack (erase.run.resolve_run_defaults)."""
        return {"train_set": "xattn", "preserve_per_step": 2, "preserve_paired": False, "adversarial": None}

    @staticmethod
    def keeps_input_copy(cfg) -> bool:
        """Whether the method holds a copy of the input's trainable subset (its targets or its sampler need it)."""
        return False

    @staticmethod
    def train_defaults(options: dict) -> dict:
        """The authors' steps / lr / EMA / trained set for this method where they differ from `erase run`'s (SDD's)."""
        return {}

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

    def erased_prompts(self) -> dict[str, str]:
        """Each prompt the method erases, with its concept (SDD and ESD; the retain term's paired prompts need them)."""
        return {}

    def student_loss(self, d: Draw, cond=None) -> torch.Tensor:
        """|| eps_theta(z, t, c) - target ||^2 with c the draw's own prompt, or `cond` (an attacked conditioning)."""
        b = d.z.shape[0]
        pred = predict(self.unet, d.z, d.t, cond if cond is not None else self.embeddings[d.prompt].repeat(b), self.resolution, self.counter)
        self.counter.backward(b)
        return prediction_mse(pred, d.target, d.t, self.scheduler)

    def loss(self, step: int, teacher) -> tuple[torch.Tensor, dict]:
        """One `draw(step, teacher) -> Draw` (SDD, ESD define it) scored by `student_loss`; a method whose loss is not one
        draw (CA) overrides this and sets `adversarial = False`."""
        d = self.last_draw = self.draw(step, teacher)
        return self.student_loss(d), d.info
