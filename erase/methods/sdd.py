"""SDD: Safe Self-Distillation (Kim, Choi, Lee, Yoon, Kim; "Towards Safe Self-Distillation of
Internet-Scale Text-to-Image Diffusion Models", arXiv 2307.05977, 2023).

Notation (paper -> code):
  c_p        `self.target_prompt`   all concepts joined with ", " (the teacher's prompt)
  c_s        `self.pairs[step][0]` one concept per step ("iterative") or c_p ("composite"); with `expand`,
             each concept's prompts in turn ("a red circle"), the target then eps(z_t, t, "a red")
  theta*     the EMA of the trainable parameters (the teacher: the trainer passes its weights by name)
  z_t        a latent from the teacher's own DDIM trajectory with CFG on c_p, at timestep t
  eps_theta  the student UNet

Loss of one step, as the authors implemented it:
  1. k ~ U{0..K-1}; run the EMA teacher k DDIM steps from z_T ~ N(0, I) with CFG scale w on c_p.
  2. t = t_k, the timestep the latent actually sits at after k steps.
  3. L = || eps_theta(z_t, t, c_s) - stopgrad(eps_theta(z_t, t, "")) ||^2
     (the target is the student's own unconditional output, not the teacher's).
The trainer then clips, steps AdamW, and updates the EMA; the EMA weights are the result.

Two quirks of the reference are not copied: it trains at a timestep drawn from a 20-step bin
that is off by -1..+18 from the latent's (we use the latent's own t_k), and at k = 0 it samples the
whole trajectory and trains on the fully denoised z_0 at a timestep in [980, 999], a clean latent
labelled as pure noise (we train on z_T at t_0, like every other k, at no cost).

`reuse` (ours, default 1 = reference): harvest that many latents from one teacher trajectory,
one per optimizer step, to divide the teacher's cost.

`target` (ours, default "self" = reference): "frozen" computes the target eps(z_t, t, "") with the
input model's weights instead of the student's. The self target moves with the student: on the
shapes-world model eps(z, "") drifted by 6-7 times a prompt's whole gap in 300 steps while the
circle prompt's gap did not shrink (1.1-1.3 times the base's), so every prompt changed
(benchmarks/README.md). A frozen
target cannot move. It costs one copy of the trainable subset, like the EMA, and no extra UNet
evaluations.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from erase.engine.params import frozen_copy
from erase.engine.sampling import Weights, beta_weights, harvest, load_queues, negative_guided, predict, queues_state, take
from erase.errors import UsageError
from erase.methods.base import Draw, TrainedMethod
from erase.methods.options import option
from erase.models import Conditioning
from erase.vocabulary import Vocabulary, expand, without

CONCEPT_MODES = ("iterative", "composite")
TARGETS = ("self", "frozen")
TIMESTEPS = ("uniform", "beta")
TRAJECTORIES = ("teacher", "frozen")
PRESERVING_REUSE = 25  # latents per input-model trajectory under preservation (issue 36)
PRESERVING_PER_STEP = 3  # retain prompts per step under preservation (their targets come free with the trajectories)
SAMPLE_ON = ("joined", "own")


@dataclass
class SDDConfig:
    guidance: float = option(3.0, "CFG scale of the sampled latents.")  # of the teacher trajectory (reference 3.0)
    sample_steps: int = option(50, "DDIM steps of sampled trajectories, K.")  # the teacher's (reference 50)
    concept_mode: str = option("iterative", "iterative = one concept per step (reference); composite = all joined.", choices=CONCEPT_MODES,
                               summary=True)
    reuse: int = option(1, "Training latents harvested per sampled trajectory (1 = reference, the default with --preserve none; 25, "
                        "at most --sample-steps, otherwise; more is cheaper).")
    target: str = option("self", "Whose eps is the target: self = the student's (reference; the default with --preserve none); "
                         "frozen = the input model's (the default otherwise).", choices=TARGETS, summary=True)
    # c_s cycles through each concept's prompts in the vocabulary's templates ("a red circle"), each with the target
    # eps(z_t, t, the prompt without the concept) ("a red"); False: the bare concepts and "" (reference)
    expand: bool = False
    # where on the trajectory to train: "uniform" k ~ U{0..K-1} (reference); "beta" k/K ~ Beta(3, 3), the middle of the
    # trajectory, as HFI erases its learned tokens (Kim et al. 2024)
    timesteps: str = option("uniform", "Where on the teacher's trajectory to train: uniform (reference) or beta (Beta(3, 3), "
                            "mid-trajectory, as HFI erases its learned tokens).", choices=TIMESTEPS)
    trajectories: str = option("teacher", "Who draws the training latents: teacher = the EMA teacher (reference; the default with "
                               "--preserve none); frozen = the input model, as ESD samples (the default otherwise).",
                               choices=TRAJECTORIES, summary=True)
    # SDD's expanded target "a red" can itself draw the concept (the model's prior for the missing word: on the shapes
    # model, "a {colour}" alone draws triangles 24% and squares 27% of the time, circles never), so a target without the
    # concept is not always a target away from it; eta > 0 pushes it away, as ESD's negative guidance does
    eta: float = option(0.0, "Negative guidance of the target: eps(z, w) - eta * (eps(z, c) - eps(z, w)), w the prompt without the "
                        "concept ('' unless --expand), all the input model's. SDD: 0 = the reference, above 0 with --target "
                        "frozen; ESD: the reference's 1.0 (the authors' newer script 2.0).", summary=True)
    # measured on the shapes model (issue 36): pushing a square away with --eta pushed circles, its nearest neighbour, away
    # too (circles at 50% of base at eta 0.5). Sparing the neighbour's direction did not keep them (44%): the neighbour is
    # lost through the keys and values the prompts share, not through the target's direction (benchmarks/README.md)
    eta_spare: bool = option(False, "With --eta: remove from the push, per sample, its component along the nearest preserved "
                             "neighbour's own direction (eps(z, n) - eps(z, w), n the erased prompt naming the neighbour: 'a red "
                             "circle' for 'a red square'), so that what the two share is not pushed away. One more UNet "
                             "evaluation per step; needs --preserve auto.")
    sample_on: str = option("joined", "The prompt the latents are drawn on: joined = all concepts joined with ', ' (reference; the "
                            "default with --preserve none); own = each step's own student prompt (with --expand: 'a red circle', "
                            "whose target is 'a red'; the default otherwise).", choices=SAMPLE_ON, summary=True)

    def validate(self) -> None:
        if self.guidance < 0:
            raise UsageError("--guidance must be >= 0")
        if self.sample_steps < 1:
            raise UsageError("--sample-steps must be >= 1")
        if self.concept_mode not in CONCEPT_MODES:
            raise UsageError(f"--concept-mode must be one of {', '.join(CONCEPT_MODES)}")
        if not 1 <= self.reuse <= self.sample_steps:
            raise UsageError(f"--reuse must be between 1 and --sample-steps ({self.sample_steps})")
        if self.target not in TARGETS:
            raise UsageError(f"--target must be one of {', '.join(TARGETS)}")
        if self.timesteps not in TIMESTEPS:
            raise UsageError(f"--timesteps must be one of {', '.join(TIMESTEPS)}")
        if self.trajectories not in TRAJECTORIES:
            raise UsageError(f"--trajectories must be one of {', '.join(TRAJECTORIES)}")
        if self.eta < 0:
            raise UsageError("--eta must be >= 0")
        if self.eta_spare and self.eta == 0:
            raise UsageError("--eta-spare spares a neighbour from the --eta push: give --eta above 0")
        if self.eta > 0 and self.target != "frozen":
            raise UsageError("--eta needs --target frozen: the direction it pushes away from is the input model's")
        if self.sample_on not in SAMPLE_ON:
            raise UsageError(f"--sample-on must be one of {', '.join(SAMPLE_ON)}")
        if self.expand and self.concept_mode != "iterative":
            raise UsageError("--expand works with --concept-mode iterative (each expanded prompt is one concept's)")


class SDD(TrainedMethod):
    """One SDD loss per call. Holds no trainable state of its own beyond the queue of harvested latents."""

    name = "sdd"

    def __init__(self, cfg: SDDConfig, concepts: list[str], *, vocab: Vocabulary | None = None, **engine) -> None:
        super().__init__(cfg, concepts, **engine)  # unet, scheduler, latent_shape, resolution, generator, device, counter
        self.pairs, self.vocab = self.student_pairs(cfg, concepts, vocab), vocab
        self.target_prompt = ", ".join(concepts)
        self.embeddings: dict[str, Conditioning] = {}
        self.neighbours: dict[str, str] = {}  # erased concept -> its nearest preserved concept (set by the run: --eta-spare)
        self.erased = self.erased_prompts()  # once: --eta-spare looks the step's prompt up at every step
        # per stream, per trajectory prompt (c_p for the teacher, each c_s for the input model): (z_t, k) not yet trained on
        self.pending: list[dict[str, list[tuple[torch.Tensor, int]]]] = [{} for _ in self.generators]
        self.frozen = frozen_copy(self.trainable) if self.keeps_input_copy(cfg) else None  # the input's: built before any step
        self.scheduler.set_timesteps(cfg.sample_steps)

    @staticmethod
    def preserving_config(given: dict) -> dict:
        """SDD's defaults under preservation (the reference's with --preserve none), given the options the user gave.
        Measured on the shapes model (benchmarks/README.md, issue 36): the input model's latents on each step's own prompt
        keep colour and erase other shapes as well as circles; they never go stale, so each trajectory serves `reuse`
        steps (at most one per DDIM step of a shorter --sample-steps)."""
        steps = given.get("sample_steps", SDDConfig.sample_steps)
        return {"trajectories": "frozen", "sample_on": "own", "reuse": min(PRESERVING_REUSE, steps)}

    @staticmethod
    def run_defaults(preserving: bool) -> dict:
        """Under preservation: attn2's keys and values trained, 3 retain prompts per step and the shared inner attack
        (one prefix step per step from the attacked term's forward). On the shapes model the keys and values kept the
        neighbours and the inner attack made them hold both attacks, for 6 more UNet evaluations per step; the paired
        retain prompts kept more neighbours but let circles back (benchmarks/README.md, issue 36): off."""
        from erase.engine.adversarial import AdversarialConfig

        if not preserving:
            return {"train_set": "xattn", "preserve_per_step": 2, "preserve_paired": False, "adversarial": None}
        return {"train_set": "xattn-kv", "preserve_per_step": PRESERVING_PER_STEP, "preserve_paired": False,
                "adversarial": AdversarialConfig()}

    @staticmethod
    def keeps_input_copy(cfg: SDDConfig) -> bool:
        return cfg.target == "frozen" or cfg.trajectories == "frozen"

    @staticmethod
    def student_pairs(cfg: SDDConfig, concepts: list[str], vocab: Vocabulary | None = None) -> list[tuple[str, str]]:
        """(c_s, the prompt whose eps is the target) for each step, cycled in order."""
        if cfg.concept_mode == "composite":
            return [(", ".join(concepts), "")]
        if not cfg.expand:
            return [(c, "") for c in concepts]
        if vocab is None:
            raise UsageError("--expand needs a vocabulary")
        per_concept = [[(p, without(p, c)) for p in expand(c, vocab)] for c in concepts]
        return [pair for group in itertools.zip_longest(*per_concept) for pair in group if pair]  # concepts take turns

    def erased_prompts(self) -> dict[str, str]:
        """Each student prompt's erased concept ("a red circle" -> "circle"); the joined prompt of composite mode has none."""
        if self.cfg.concept_mode == "composite":
            return {}
        return {p: c for c in self.concepts for p in (expand(c, self.vocab) if self.cfg.expand else [c])}

    @classmethod
    def prompts_for(cls, cfg: SDDConfig, concepts: list[str], vocab: Vocabulary | None = None) -> list[str]:
        """Every prompt the method conditions on; the engine encodes them once, before the UNet is loaded,
        then frees the text encoder."""
        pairs = cls.student_pairs(cfg, concepts, vocab)
        return list(dict.fromkeys(["", ", ".join(concepts), *(p for pair in pairs for p in pair)]))

    def prompts(self) -> list[str]:
        return list(dict.fromkeys(["", self.target_prompt, *(p for pair in self.pairs for p in pair)]))

    def student_prompt(self, step: int) -> str:
        return self.pairs[step % len(self.pairs)][0]

    @property
    def retain_sampler(self) -> str:
        """The retain term samples where the method does: with the input model when its trajectories are the input's."""
        return "frozen" if self.cfg.trajectories == "frozen" else "teacher"

    def trajectory_prompt(self, step: int) -> str:
        """The prompt the step's latents are sampled on: all concepts joined (reference), or the step's own student prompt."""
        return self.target_prompt if self.cfg.sample_on == "joined" else self.student_prompt(step)

    def sampler(self, teacher: Weights) -> Weights:
        """The weights the trajectories run with: the EMA teacher's (reference) or the input model's."""
        return teacher if self.cfg.trajectories == "teacher" else self.frozen

    @property
    def free_concept_eps(self) -> bool:
        """Whether each latent's trajectory brings the input model's eps(z_t, t, c_s) with it (the conditional half of its
        guided call): the input model's trajectories on the step's own prompt. The negative-guided target then costs no
        more UNet evaluations than the plain one."""
        return self.cfg.eta > 0 and self.cfg.trajectories == "frozen" and self.cfg.sample_on == "own"

    def _harvest(self, teacher: Weights, streams: list[int], prompt: str | None = None) -> list[list[tuple[torch.Tensor, int]]]:
        """One trajectory per stream, batched; `reuse` latents from each."""
        return harvest(self.unet, self.scheduler, self.embeddings[""], self.embeddings[prompt or self.target_prompt],
                       guidance=self.cfg.guidance, num_steps=self.cfg.sample_steps, reuse=self.cfg.reuse,
                       latent_shape=self.latent_shape, resolution=self.resolution, generators=[self.generators[i] for i in streams],
                       device=self.device, teacher=self.sampler(teacher), counter=self.counter,
                       pick_weights=beta_weights(self.cfg.sample_steps) if self.cfg.timesteps == "beta" else None,
                       with_cond=self.free_concept_eps)

    def draw(self, step: int, teacher: Weights) -> Draw:
        prompt = self.trajectory_prompt(step)
        queues = [stream.setdefault(prompt, []) for stream in self.pending]
        z_t, k, concept_eps = take(queues, lambda streams: self._harvest(teacher, streams, prompt))  # one latent per stream
        t = self.scheduler.timesteps[k].to(self.device)  # each latent's own timestep (reference: a shifted bin)
        c_s, without_concept = self.pairs[step % len(self.pairs)]
        b = z_t.shape[0]
        with torch.no_grad():  # the frozen target names the input's weights; the self target is the student's own
            if self.cfg.eta == 0:
                target = predict(self.unet, z_t, t, self.embeddings[without_concept].repeat(b), self.resolution, self.counter,
                                 weights=self.frozen)
            else:
                spare = self.spared_prompt(c_s) if self.cfg.eta_spare else None
                target = negative_guided(self.unet, z_t, t, self.embeddings[without_concept].repeat(b), self.embeddings[c_s].repeat(b),
                                         self.cfg.eta, self.resolution, self.counter, weights=self.frozen, concept_eps=concept_eps,
                                         spare=self.embeddings[spare].repeat(b) if spare else None)
        return Draw(z_t, t, c_s, target, {"k": k, "t": t, "c_s": c_s})  # tensors: read only if anyone asks (no host sync)

    def spared_prompt(self, prompt: str) -> str | None:
        """The student prompt naming its concept's nearest neighbour ("a red square" -> "a red circle"), when it is encoded."""
        from erase.engine.preserve import swap_concept

        concept = self.erased.get(prompt)
        if concept is None or concept not in self.neighbours:
            return None
        spare = swap_concept(prompt, concept, self.neighbours[concept])
        return spare if spare in self.embeddings else None

    def state_dict(self) -> dict:
        return {"pending": queues_state(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.pending = load_queues(state["pending"], self.device)
