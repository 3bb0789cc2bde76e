"""What an erasure must leave alone: the preserved concepts, chosen by the user or found automatically.

    --preserve "square, triangle"   these concepts (each expanded into the vocabulary's prompts)
    --preserve auto | auto:N        for each erased concept, the N (default 5) concepts of the vocabulary
                                    nearest to it in the checkpoint's own text encoder
    --preserve none                 nothing, not even "" (the reference algorithms)
Entries combine ("auto:3, sky"); `--preserve-file` adds one concept per line. The empty prompt "" is
always held unless `none` is given: every prompt is guided from it.

Nearest is measured where cross-attention reads the text: the encoder's outputs at the concept's own tokens
and after them (under CLIP's causal mask the positions before the concept are the same for every concept),
averaged over the vocabulary's templates, compared by cosine similarity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.engine.noise import prediction_mse
from erase.engine.params import frozen_copy, trained_params
from erase.engine.sampling import harvest, load_queues, predict, queues_state, take
from erase.errors import UsageError
from erase.models import MAX_TOKENS, Conditioning
from erase.vocabulary import Vocabulary, expand, token_span

DEFAULT_AUTO = 5


@dataclass
class PreserveSpec:
    concepts: list[str] = field(default_factory=list)  # named by the user
    auto: int = 0  # nearest concepts to add per erased concept
    hold_empty: bool = True  # "" is held unless --preserve none

    @property
    def none(self) -> bool:
        return not (self.concepts or self.auto or self.hold_empty)


def parse_preserve(text: str | None, file: Path | None = None) -> PreserveSpec:
    """The `--preserve` / `--preserve-file` options as a spec (usage errors say what is allowed)."""
    spec = PreserveSpec()
    entries = [e.strip() for e in (text or "").split(",") if e.strip()]
    if any(e.lower() == "none" for e in entries):
        if len(entries) > 1 or file:
            raise UsageError("--preserve none holds nothing; it cannot be combined with other entries or --preserve-file")
        return PreserveSpec(hold_empty=False)
    for e in entries:
        if e.lower() == "auto" or e.lower().startswith("auto:"):
            n = e.split(":", 1)[1] if ":" in e else str(DEFAULT_AUTO)
            if not n.isdigit() or int(n) < 1:
                raise UsageError(f"--preserve {e}: auto takes a positive count, as in auto:5")
            spec.auto = int(n)
        else:
            spec.concepts.append(e)
    if file is not None:
        if not Path(file).exists():
            raise UsageError(f"--preserve-file {file} does not exist")
        spec.concepts += [line.strip() for line in Path(file).read_text().splitlines() if line.strip() and not line.startswith("#")]
    spec.concepts = list(dict.fromkeys(spec.concepts))
    return spec


def _concept_vectors(encode, tokenizer, concepts: list[str], vocab: Vocabulary) -> torch.Tensor:
    """One unit vector per concept: its tokens' and the following positions' outputs, mean over templates.
    `encode(prompts, length)` pads to `length` tokens (erase.models.TextEncoder.encode)."""
    first = {k: v[:1] for k, v in vocab.fields.items()}  # one filler per field is enough to compare concepts
    small = Vocabulary(vocab.name, vocab.concepts, vocab.templates, first)
    prompts, owner = [], []
    for i, c in enumerate(concepts):
        for p in expand(c, small):
            prompts.append(p)
            owner.append(i)
    sums: list[torch.Tensor | None] = [None] * len(concepts)
    for start in range(0, len(prompts), 64):
        batch = prompts[start : start + 64]
        lengths = [len(tokenizer(p).input_ids) for p in batch]  # up to and including EOS
        embeds = encode(batch, min(max(lengths), MAX_TOKENS))  # (B, longest, D): only the prompts' own positions are read
        for k, p in enumerate(batch):
            i = owner[start + k]
            span = token_span(tokenizer, p, concepts[i])
            n = lengths[k]
            v = embeds[k, span[0] if span else 1 : n].mean(0)
            v = v / v.norm().clamp_min(1e-12)
            sums[i] = v if sums[i] is None else sums[i] + v
    vectors = torch.stack(sums)
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_concepts(encode, tokenizer, targets: list[str], vocab: Vocabulary, n: int) -> dict[str, list[tuple[str, float]]]:
    """For each target, the `n` vocabulary concepts nearest to it (cosine), best first. Concepts that contain a
    target or are contained in one ("circle" / "circles") are not candidates."""
    lowered = [t.lower() for t in targets]
    candidates = [c for c in vocab.concepts if not any(c.lower() in t or t in c.lower() for t in lowered)]
    if not candidates:
        raise UsageError(f"--preserve auto: vocabulary '{vocab.name}' has no concepts other than the erased ones")
    vec = _concept_vectors(encode, tokenizer, [*targets, *candidates], vocab)
    sims = vec[: len(targets)] @ vec[len(targets):].T
    out = {}
    for i, t in enumerate(targets):
        order = torch.argsort(sims[i], descending=True)[:n].tolist()
        out[t] = [(candidates[j], round(float(sims[i, j]), 4)) for j in order]
    return out


def preserved_groups(concepts: list[str], vocab: Vocabulary, *, expand_concepts: bool) -> dict[str, list[str]]:
    """Each preserved concept's prompts: expanded into the vocabulary's templates (or as given), "" as itself."""
    return {c: [""] if c == "" else expand(c, vocab) if expand_concepts else [c] for c in concepts}


def preserved_prompts(concepts: list[str], vocab: Vocabulary, *, expand_concepts: bool) -> list[str]:
    """The prompts that hold `concepts`, every concept's in turn, each prompt once."""
    groups = preserved_groups(concepts, vocab, expand_concepts=expand_concepts)
    return list(dict.fromkeys(p for prompts in groups.values() for p in prompts))


def resolve(spec: PreserveSpec, targets: list[str], encode, tokenizer, vocab: Vocabulary) -> tuple[list[str], dict]:
    """The concepts to preserve ("" first when held) and a record of how they were chosen (for reports)."""
    chosen = {}
    if spec.auto:
        chosen = nearest_concepts(encode, tokenizer, targets, vocab, spec.auto)
    concepts = list(dict.fromkeys([*([""] if spec.hold_empty else []), *spec.concepts, *(c for v in chosen.values() for c, _ in v)]))
    concepts = [c for c in concepts if c not in targets]
    record = {"concepts": concepts, "named": spec.concepts, "auto": spec.auto, "auto_chosen": chosen, "vocabulary": vocab.name}
    return concepts, record


PAIR_TEMPERATURE = 0.1  # paired prompts: a neighbour 0.1 more similar is drawn e times as often


def pair_weights(choices: list[str], similarity: dict[str, float]) -> torch.Tensor:
    """`--preserve-paired`: how often each preserved concept is paired with an erased one, exp(similarity /
    PAIR_TEMPERATURE) normalised; a concept without a measured similarity (named by the user) counts as the nearest."""
    nearest = max(similarity.values(), default=0.0)
    logits = torch.tensor([similarity.get(c, nearest) / PAIR_TEMPERATURE for c in choices], dtype=torch.float64)
    return torch.softmax(logits, 0)


SAMPLING = ("uniform", "loss")
SAMPLERS = ("teacher", "frozen")  # whose trajectories the retain term's latents come from
LOSS_EMA = 0.9  # --preserve-sampling loss: each concept's running retain loss keeps 0.9 of its past at every new term


class Retain:
    """The retain term that holds preserved prompts to the input model, for any trained method:

        gamma * mean_p || eps_theta(z_p, t_p, p) - eps_theta0(z_p, t_p, p) ||^2

    theta0 is a frozen copy of the trainable subset (named in one no-grad call: no second UNet) and z_p comes
    from the teacher's own trajectories on p (erase.engine.sampling.harvest, `reuse` latents per trajectory, as the
    method's latents do). Each of the `per_step` slots holds one preserved prompt, drawn at random, until its
    trajectory's latents are used up: so each slot costs about what the method's own teacher costs (a fresh prompt
    every step would cost a trajectory every step: 55 instead of 31 UNet evaluations per step on the shapes model).
    Two slots (the default) held the shapes model's neighbours better than one (benchmarks/README.md) at 45 vs 30 UNet
    evaluations per step on the shapes model.

    `sampling`: "uniform" draws a slot's prompt uniformly from all preserved prompts; "loss" first draws a preserved
    concept with probability proportional to its running retain loss (an EMA over the terms it has had; 1.0 until its
    first), then one of its prompts: the neighbour the edit moves most gets most of the slots.
    """

    def __init__(self, prompts: list[str], *, weight: float, per_step: int, unet, scheduler, guidance: float, sample_steps: int,
                 reuse: int, latent_shape: tuple[int, ...], resolution: int, generator: torch.Generator, device, counter,
                 frozen: dict[str, torch.Tensor] | None = None, generators: list[torch.Generator] | None = None,
                 sampling: str = "uniform", concept_of: dict[str, str] | None = None, sampler: str = "teacher",
                 paired: bool = False, similarity: dict[str, dict[str, float]] | None = None) -> None:
        if not prompts:
            raise UsageError("nothing to preserve")
        if sampler not in SAMPLERS:
            raise UsageError(f"the retain term samples with one of {', '.join(SAMPLERS)}, not {sampler!r}")
        self.sampling, self.sampler, self.paired = sampling, sampler, paired
        self.similarity = similarity or {}  # erased concept -> {preserved concept: cosine} (the auto choice's)
        self.concept_of = concept_of or dict.fromkeys(prompts, "")
        self.concepts = list(dict.fromkeys(self.concept_of[p] for p in prompts))
        self.prompts_of = {c: [p for p in prompts if self.concept_of[p] == c] for c in self.concepts}
        self.running_loss = dict.fromkeys(self.concepts, 1.0)
        self.prompts, self.weight, self.per_step = prompts, weight, per_step
        self.unet, self.scheduler = unet, scheduler
        self.guidance, self.sample_steps, self.reuse = guidance, sample_steps, reuse
        self.latent_shape, self.resolution, self.generator, self.device, self.counter = latent_shape, resolution, generator, device, counter
        self.generators = generators or [generator]  # the sample streams (erase.methods.base.TrainedMethod)
        self.trainable = trained_params(unet)
        # built before any step (and before a resume loads trained weights): these are the input's values
        self.frozen = frozen if frozen is not None else frozen_copy(self.trainable)
        self.embeddings: dict = {}
        streams = range(len(self.generators))
        self.pending: list[dict[str, list[tuple[torch.Tensor, int]]]] = [{} for _ in streams]  # per stream, per prompt
        self.current: list[list[str | None]] = [[None] * per_step for _ in streams]  # per stream: each slot's prompt

    def loss(self, teacher) -> torch.Tensor:
        return sum(self.terms(teacher))

    def terms(self, teacher):
        """One loss term per slot, built lazily: the trainer back-propagates each before the next is built. In each slot
        every stream works through its own prompt; the streams that need a trajectory get it in one batch."""
        for slot in range(self.per_step):
            prompts = []
            for i, g in enumerate(self.generators):
                p = self.current[i][slot]
                if p is None or not self.pending[i].get(p):
                    p = self.current[i][slot] = self._draw(g)
                prompts.append(p)
            queues = [self.pending[i].setdefault(p, []) for i, p in enumerate(prompts)]

            frozen = self.sampler == "frozen"

            def refill(streams, prompts=prompts):
                cond = Conditioning.cat([self.embeddings[prompts[i]] for i in streams])
                return harvest(self.unet, self.scheduler, self.embeddings[""], cond, guidance=self.guidance, num_steps=self.sample_steps,
                               reuse=self.reuse, latent_shape=self.latent_shape, resolution=self.resolution,
                               generators=[self.generators[i] for i in streams], device=self.device,
                               teacher=self.frozen if frozen else teacher, counter=self.counter, with_cond=frozen)

            z, k, want = take(queues, refill)  # the input model's own trajectory brings its prediction for z: the target
            t = self.scheduler.timesteps[k].to(self.device)
            cond = Conditioning.cat([self.embeddings[p] for p in prompts])
            if want is None:  # latents of the teacher: the input model's prediction for them is one more forward
                with torch.no_grad():
                    want = predict(self.unet, z, t, cond, self.resolution, self.counter, weights=self.frozen)
            got = predict(self.unet, z, t, cond, self.resolution, self.counter)
            self.counter.backward(z.shape[0])
            if self.sampling == "loss":
                with torch.no_grad():
                    for p, err in zip(prompts, (got.float() - want.float()).pow(2).flatten(1).mean(1).tolist()):
                        c = self.concept_of[p]
                        self.running_loss[c] = LOSS_EMA * self.running_loss[c] + (1 - LOSS_EMA) * err
            yield self.weight * prediction_mse(got, want, t, self.scheduler) / self.per_step

    def paired_terms(self, d, erased: dict[str, str]):
        """`paired`: the erasure's own latents held for a neighbour. For the step's erased prompt ("a red circle", its
        concept from `erased`) each stream draws one preserved concept ("square") and takes the same prompt naming it
        ("a red square"); the student's prediction for it at the erasure's z, t is held to the input model's. The edit is
        held where it acts: on the latents the erasure trains on, for the prompts nearest to the erased ones. The concept
        is drawn with probability proportional to exp(similarity / PAIR_TEMPERATURE) where `--preserve auto` measured its
        similarity to the erased concept (the nearest is held most); a concept the user named counts as the nearest."""
        concept = erased.get(d.prompt)
        if not self.paired or concept is None:
            return
        choices = [c for c in self.concepts if c and swap_concept(d.prompt, concept, c) in self.embeddings]
        if not choices:
            return
        weights = pair_weights(choices, self.similarity.get(concept, {}))
        prompts = [swap_concept(d.prompt, concept, choices[int(torch.multinomial(weights, 1, generator=g))]) for g in self.generators]
        cond = Conditioning.cat([self.embeddings[p] for p in prompts])
        with torch.no_grad():
            want = predict(self.unet, d.z, d.t, cond, self.resolution, self.counter, weights=self.frozen)
        got = predict(self.unet, d.z, d.t, cond, self.resolution, self.counter)
        self.counter.backward(d.z.shape[0])
        yield self.weight * prediction_mse(got, want, d.t, self.scheduler) / self.per_step

    def _draw(self, g: torch.Generator) -> str:
        if self.sampling == "uniform":
            return self.prompts[int(torch.randint(len(self.prompts), (1,), generator=g))]
        weights = torch.tensor([self.running_loss[c] for c in self.concepts], dtype=torch.float64).clamp_min(1e-12)
        concept = self.concepts[int(torch.multinomial(weights, 1, generator=g))]
        mine = self.prompts_of[concept]
        return mine[int(torch.randint(len(mine), (1,), generator=g))]

    def state_dict(self) -> dict:
        return {"pending": queues_state(self.pending), "current": [list(c) for c in self.current], "running_loss": dict(self.running_loss)}

    def load_state_dict(self, state: dict) -> None:
        self.pending = load_queues(state["pending"], self.device)
        self.current = [list(c) for c in state["current"]]
        self.running_loss.update(state.get("running_loss", {}))


def swap_concept(prompt: str, concept: str, other: str) -> str:
    """`prompt` naming `other` where it named `concept` (its first mention, as a whole word)."""
    return re.sub(rf"(?<!\w){re.escape(concept)}(?!\w)", other.replace("\\", "\\\\"), prompt, count=1)


class WithRetain:
    """A trained method plus the retain term, seen by the trainer as one method. `erased`: each erased prompt's concept
    (for the retain term's paired prompts)."""

    def __init__(self, method, retain: Retain, erased: dict[str, str] | None = None) -> None:
        self.method, self.retain, self.erased = method, retain, erased or {}

    def loss(self, step: int, teacher) -> tuple[torch.Tensor, dict]:
        terms = list(self.terms(step, teacher))
        return sum(terms), {"retain": float(sum(terms[1:]))}

    def terms(self, step: int, teacher):
        """The method's loss, then one retain term per slot. Back-propagated one at a time by the trainer, so only one
        UNet graph is alive at once: summing them first kept three at 512 px (10.8 GB peak instead of 6.8 on SD 1.5)."""
        yield from self.method_terms(step, teacher)
        yield from self.retain_terms(teacher)

    def retain_terms(self, teacher):
        """The retain term's: the pair on the erasure's own latents (when `paired`), then one per slot."""
        if self.retain.paired:
            yield from self.retain.paired_terms(self.method.last_draw, self.erased)
        yield from self.retain.terms(teacher)

    def method_terms(self, step: int, teacher):
        """The erasing method's own terms (the trainer can keep their gradient apart: TrainConfig.project_retain)."""
        if hasattr(self.method, "terms"):  # --adversarial: the plain and the attacked prompt
            yield from self.method.terms(step, teacher)
        else:
            yield self.method.loss(step, teacher)[0]

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "retain": self.retain.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.retain.load_state_dict(state["retain"])
