"""Concept Ablation (Kumari, Zhang, Wang, Shechtman, Zhang, Zhu; ICCV 2023, arXiv 2303.13516).

The target concept is replaced by an anchor concept ("Grumpy Cat" -> "cat", "circle" -> "square"): the model is
taught that a caption naming the target should denoise like the same caption naming the anchor.

Notation (paper -> code):
  c          an anchor caption (the anchor in one of the vocabulary's templates: "a red square")
  c*         the same caption with the target in the anchor's place ("a red circle"); for styles
             (`concept_type = "style"`), the anchor caption followed by ", in the style of <target>"
  x_0        an anchor sample: a latent the input model generated from c (no VAE: its own latents)
  x_t        x_0 noised to a timestep t ~ U{0..T-1} with eps ~ N(0, I)

Loss of one step (model-based variant, the default):
  1. pick an anchor sample x_0 and its caption c; t ~ U{0..T-1}; x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.
  2. L = || eps_theta(x_t, t, c*) - stopgrad(eps_theta(x_t, t, c)) ||^2
     (the anchor prediction comes from the model being trained, as in the authors' code; `variant = "noise"`
     uses the sampled eps instead).
  3. with prior preservation (`prior_weight` > 0): + prior_weight * || eps_theta(x_t', t', c) - eps' ||^2 on an
     anchor sample, the ordinary denoising loss (weight 1.0 in the authors' diffusers script, 0.2 in CompVis).
On SD3 / FLUX.1 the same loss in flow-matching terms: x_t on the flow's forward process, velocities as predictions and
the sampled velocity as the prior's target, each error weighted by (1 - sigma)^2 as the eps error it stands for
(erase.engine.noise.prediction_mse); the anchor samples from the family's Euler sampler.
Anchor samples are generated once per run by the input model (DDIM `sample_steps`, CFG `guidance`), counted in
the run's UNet evaluations and kept in the resume state. The authors train attn2 keys and values (`--train
xattn-kv`) for objects and styles; `concept_type` presets set their learning rate, steps and trained set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from erase.engine.noise import forward_process, prediction_mse
from erase.engine.sampling import ddim_trajectory, guided, predict
from erase.errors import UsageError
from erase.methods.base import TrainedMethod
from erase.methods.options import option
from erase.models import Conditioning
from erase.vocabulary import Vocabulary, expand

VARIANTS = ("model", "noise")
CONCEPT_TYPES = ("object", "style", "nudity", "memorized")
# The authors' settings per concept type (their README, per 2 GPUs x batch 4; lr as they scale it): lr, steps, trained set
PRESETS = {
    "object": {"lr": 1.6e-5, "steps": 100, "train_set": "xattn-kv"},
    "style": {"lr": 1.6e-5, "steps": 100, "train_set": "xattn-kv"},
    "nudity": {"lr": 3.2e-5, "steps": 400, "train_set": "attn"},  # authors: 4e-6 x batch 8
    "memorized": {"lr": 4e-6, "steps": 400, "train_set": "full"},
}


@dataclass
class CAConfig:
    anchor: str = option("", "What each erased concept becomes (\"square\"; one, or one per concept).", summary=True)  # required
    variant: str = option("model", "model (the anchor caption's prediction is the target, reference) or noise (the sampled eps).",
                          choices=("model", "noise"), summary=True)
    concept_type: str = option("object", "object, style, nudity or memorized: the authors' lr, steps and trained set.",
                               choices=CONCEPT_TYPES, summary=True)
    prior_weight: float = option(0.0, "Weight of the denoising loss on anchor samples (authors: 1.0 when on).")
    anchor_samples: int = option(64, "Anchor latents the input model generates once per run (authors: 1000).")
    guidance: float = option(6.0, "CFG scale of the sampled latents.")  # the anchor samples (authors: 6.0)
    sample_steps: int = option(25, "DDIM steps of sampled trajectories, K.")  # the anchor samples (authors: 25, DPM-Solver)
    anchor_prompts: str | None = option(None, "Anchor captions, one per line (default: the vocabulary's templates).")

    def validate(self) -> None:
        if not self.anchor.strip():
            raise UsageError("--method ca needs --anchor: the concept each erased concept becomes (\"circle\" -> \"square\")")
        if self.variant not in VARIANTS:
            raise UsageError(f"--variant must be one of {', '.join(VARIANTS)}")
        if self.concept_type not in CONCEPT_TYPES:
            raise UsageError(f"--concept-type must be one of {', '.join(CONCEPT_TYPES)}")
        if self.prior_weight < 0 or self.anchor_samples < 1 or self.sample_steps < 1 or self.guidance < 0:
            raise UsageError("--prior-weight and --guidance must be >= 0; --anchor-samples and --sample-steps >= 1")


class CA(TrainedMethod):
    """One Concept Ablation loss per call; the anchor samples are its only state."""

    batched = False  # anchors and their noise come from one generator: --batch-size 1, one process
    name = "ca"

    @staticmethod
    def train_defaults(options: dict) -> dict:
        """The authors' lr, steps and trained set for the concept type; no EMA (they keep none)."""
        return {**PRESETS[options.get("concept_type", "object")], "ema_decay": 0.0}

    def __init__(self, cfg: CAConfig, concepts: list[str], *, vocab: Vocabulary | None = None, **engine) -> None:
        super().__init__(cfg, concepts, **engine)  # unet, scheduler, latent_shape, resolution, generator, device, counter
        self.pairs = self.caption_pairs(cfg, concepts, vocab)
        self.embeddings: dict[str, Conditioning] = {}
        self.anchors: list[tuple[torch.Tensor, int]] = []  # (x_0, index into pairs)
        self.noise = forward_process(self.scheduler)

    @staticmethod
    def caption_pairs(cfg: CAConfig, concepts: list[str], vocab: Vocabulary | None) -> list[tuple[str, str]]:
        """(anchor caption c, target caption c*) pairs; erased concepts take turns."""
        anchors = [a.strip() for a in cfg.anchor.split(",")]
        if len(anchors) == 1:
            anchors = anchors * len(concepts)
        if len(anchors) != len(concepts):
            raise UsageError(f"--anchor names {len(anchors)} concepts for {len(concepts)} erased concepts: give one, or one each")
        if cfg.anchor_prompts:
            from pathlib import Path

            lines = [x.strip() for x in Path(cfg.anchor_prompts).read_text().splitlines() if x.strip()]
        groups = []
        for target, anchor in zip(concepts, anchors):
            if cfg.anchor_prompts:
                captions = [x for x in lines if anchor in x] or lines
            else:
                captions = expand(anchor, vocab) if vocab is not None else [anchor]
            if cfg.concept_type == "style":
                groups.append([(c, f"{c}, in the style of {target}") for c in captions])
            else:
                groups.append([(c, c.replace(anchor, target, 1) if anchor in c else f"{target}, {c}") for c in captions])
        return [p for group in itertools.zip_longest(*groups) for p in group if p]

    @classmethod
    def prompts_for(cls, cfg: CAConfig, concepts: list[str], vocab: Vocabulary | None = None) -> list[str]:
        return list(dict.fromkeys(["", *(p for pair in cls.caption_pairs(cfg, concepts, vocab) for p in pair)]))

    ANCHOR_BATCH = 8  # anchor samples drawn per batched trajectory

    @torch.no_grad()
    def _generate_anchors(self) -> None:
        """The input model's own samples of the anchor captions (called at step 0, before any update), ANCHOR_BATCH at a
        time: one UNet call per DDIM step for the batch. Each sample's noise is drawn in the same order as one at a time,
        so only float rounding of the batched convolutions differs."""
        last = self.cfg.sample_steps
        for start in range(0, self.cfg.anchor_samples, self.ANCHOR_BATCH):
            idx = range(start, min(start + self.ANCHOR_BATCH, self.cfg.anchor_samples))
            captions = [i % len(self.pairs) for i in idx]
            z_T = torch.cat([torch.randn(self.latent_shape, generator=self.generator) for _ in idx]).to(self.device)
            uncond = self.embeddings[""].repeat(len(captions))
            cond = Conditioning.cat([self.embeddings[self.pairs[j][0]] for j in captions])
            z = ddim_trajectory(self.unet, self.scheduler, z_T, uncond, cond, scale=self.cfg.guidance, num_steps=last, keep=[last - 1],
                                resolution=self.resolution, counter=self.counter)[last - 1]
            t = self.scheduler.timesteps[-1]  # the last guided DDIM step, from t_{K-1} to x_0
            out = guided(self.unet, z, t, uncond, cond, self.cfg.guidance, self.resolution, self.counter)
            z = self.scheduler.step(out, t, z.float()).prev_sample.to(z.dtype)
            self.anchors += [(z[k : k + 1], j) for k, j in enumerate(captions)]

    def _noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, the model's timestep, what the model should output for it: eps, v, or a flow's velocity)."""
        t = torch.randint(self.noise.num_train_timesteps, (1,), generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator).to(self.device, torch.float32)
        t = t.to(self.device)
        x_t, truth = self.noise.noised(x0.float(), eps, t)
        return x_t.to(x0.dtype), self.noise.timestep(t), truth

    adversarial = False  # its loss pairs an anchor caption with the concept's and adds a prior term: not one draw

    def loss(self, step: int, teacher) -> tuple[torch.Tensor, dict]:
        if not self.anchors:
            self._generate_anchors()
        x0, j = self.anchors[int(torch.randint(len(self.anchors), (1,), generator=self.generator))]
        anchor, target = self.pairs[j]
        x_t, t, truth = self._noised(x0)
        if self.cfg.variant == "model":
            with torch.no_grad():
                want = predict(self.unet, x_t, t, self.embeddings[anchor], self.resolution, self.counter).float()
        else:
            want = truth
        got = predict(self.unet, x_t, t, self.embeddings[target], self.resolution, self.counter)
        self.counter.backward(1)
        loss = prediction_mse(got, want, t, self.scheduler)  # a flow model's velocity error weighted as the eps error it is
        if self.cfg.prior_weight:
            x0p, jp = self.anchors[int(torch.randint(len(self.anchors), (1,), generator=self.generator))]
            xp, tp, truthp = self._noised(x0p)
            prior = predict(self.unet, xp, tp, self.embeddings[self.pairs[jp][0]], self.resolution, self.counter)
            self.counter.backward(1)
            loss = loss + self.cfg.prior_weight * prediction_mse(prior, truthp, tp, self.scheduler)
        return loss, {"t": t, "c": anchor, "c*": target}  # t as a tensor: no host sync per step

    def state_dict(self) -> dict:
        return {"anchors": [x.cpu() for x, _ in self.anchors], "anchor_caption": [j for _, j in self.anchors]}

    def load_state_dict(self, state: dict) -> None:
        self.anchors = [(x.to(self.device), j) for x, j in zip(state["anchors"], state["anchor_caption"])]
