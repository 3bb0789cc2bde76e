"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzynska, Fiotto-Kaufman, Bau; ICCV 2023,
arXiv 2303.07345).

Notation (paper -> code):
  c          the concept: one per step, cycled ("iterative"; with `expand`, each concept's prompts in turn)
  theta*     the frozen input weights of the trainable subset (`self.frozen`, passed by name: no second UNet)
  eta        `eta`, the negative-guidance scale (1.0 in the paper's code, 2.0 in the authors' newer script)
  z_t        a latent from a DDIM trajectory of the frozen model with CFG 3 on c, stopped at a random step
             (as the authors' newer script samples; their first script sampled with the model being trained)

Loss of one step:
  1. k ~ U{0..K-1}; run the frozen model k DDIM steps from z_T ~ N(0, I) with CFG `guidance` on c.
  2. t = t_k, the latent's own timestep (the first script drew t from the 20-step bin around it).
  3. target = eps_theta*(z_t, t, "") - eta * (eps_theta*(z_t, t, c) - eps_theta*(z_t, t, ""))   (one batched call)
     L = || eps_theta(z_t, t, c) - stopgrad(target) ||^2
With classifier-free guidance the erased model then steers away from c as far as it used to steer towards it.
Which weights train is `--train`: ESD-x = xattn (attn2; the authors' choice for styles), esd-x-strict =
xattn-kv, ESD-u = noxattn (everything but attn2; for nudity and objects). The authors keep no EMA: the trained
weights are the result (`--ema-decay 0`, the default for this method).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from erase.engine.params import frozen_copy
from erase.engine.sampling import Weights, harvest, load_queues, negative_guided, queues_state, take
from erase.errors import UsageError
from erase.methods.base import Draw, TrainedMethod
from erase.methods.options import option
from erase.models import Conditioning
from erase.vocabulary import Vocabulary, expand


@dataclass
class ESDConfig:
    eta: float = option(1.0, "Negative-guidance scale (reference 1.0; the authors' newer script 2.0).", summary=True)
    guidance: float = option(3.0, "CFG scale of the sampled latents.")  # the frozen model's trajectory (reference 3.0)
    sample_steps: int = option(50, "DDIM steps of sampled trajectories, K.")  # (reference 50)
    reuse: int = option(1, "Training latents harvested per sampled trajectory (1 = reference; more is cheaper).")
    expand: bool = False  # train on each concept's prompts in the vocabulary's templates (False: the bare concept, reference)

    def validate(self) -> None:
        if self.eta < 0:
            raise UsageError("--eta must be >= 0")
        if self.guidance < 0:
            raise UsageError("--guidance must be >= 0")
        if self.sample_steps < 1:
            raise UsageError("--sample-steps must be >= 1")
        if not 1 <= self.reuse <= self.sample_steps:
            raise UsageError(f"--reuse must be between 1 and --sample-steps ({self.sample_steps})")


class ESD(TrainedMethod):
    """One ESD loss per call; the frozen copy of the trainable subset is both sampler and target."""

    name = "esd"

    @staticmethod
    def train_defaults(options: dict) -> dict:
        """The paper's first script: 1000 Adam steps at 1e-5, no EMA."""
        return {"steps": 1000, "lr": 1e-5, "ema_decay": 0.0}

    def __init__(self, cfg: ESDConfig, concepts: list[str], *, vocab: Vocabulary | None = None, **engine) -> None:
        super().__init__(cfg, concepts, **engine)  # unet, scheduler, latent_shape, resolution, generator, device, counter
        self.student, self.vocab = self.student_prompts(cfg, concepts, vocab), vocab
        self.embeddings: dict[str, Conditioning] = {}
        self.pending: list[dict[str, list]] = [{} for _ in self.generators]  # per stream, per prompt: (z_t, k) not yet trained on
        self.frozen = frozen_copy(self.trainable)  # the input's values: built before any step
        self.scheduler.set_timesteps(cfg.sample_steps)

    @staticmethod
    def keeps_input_copy(cfg: ESDConfig) -> bool:
        return True  # its sampler and its targets

    @staticmethod
    def student_prompts(cfg: ESDConfig, concepts: list[str], vocab: Vocabulary | None = None) -> list[str]:
        if not cfg.expand:
            return list(concepts)
        if vocab is None:
            raise UsageError("--expand needs a vocabulary")
        return [p for group in itertools.zip_longest(*(expand(c, vocab) for c in concepts)) for p in group if p]

    def erased_prompts(self) -> dict[str, str]:
        """Each student prompt's erased concept."""
        return {p: c for c in self.concepts for p in (expand(c, self.vocab) if self.cfg.expand else [c])}

    @classmethod
    def prompts_for(cls, cfg: ESDConfig, concepts: list[str], vocab: Vocabulary | None = None) -> list[str]:
        return list(dict.fromkeys(["", *cls.student_prompts(cfg, concepts, vocab)]))

    def draw(self, step: int, teacher: Weights) -> Draw:
        c = self.student[step % len(self.student)]
        queues = [self.pending[i].setdefault(c, []) for i in range(len(self.generators))]  # per stream, per prompt

        def refill(streams):  # latents are harvested on the step's own prompt, by the input model (not the EMA teacher)
            return harvest(self.unet, self.scheduler, self.embeddings[""], self.embeddings[c], guidance=self.cfg.guidance,
                           num_steps=self.cfg.sample_steps, reuse=self.cfg.reuse, latent_shape=self.latent_shape, resolution=self.resolution,
                           generators=[self.generators[i] for i in streams], device=self.device, teacher=self.frozen, counter=self.counter)

        z_t, k, _ = take(queues, refill)
        b = z_t.shape[0]
        t = self.scheduler.timesteps[k].to(self.device)
        with torch.no_grad():
            target = negative_guided(self.unet, z_t, t, self.embeddings[""].repeat(b), self.embeddings[c].repeat(b), self.cfg.eta,
                                     self.resolution, self.counter, weights=self.frozen)
        return Draw(z_t, t, c, target, {"k": k, "t": t, "c": c})  # tensors: read only if anyone asks (no host sync)

    def state_dict(self) -> dict:
        return {"pending": queues_state(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.pending = load_queues(state["pending"], self.device)
