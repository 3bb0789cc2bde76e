"""Adversarial training for the trained methods (`erase run --adversarial`), after AdvUnlearn (Zhang, Chen, Jia, Zhang,
Liu et al., NeurIPS 2024, arXiv 2405.15234).

Each step, before the method's own update, an inner attack looks for the conditioning that best brings the concept
back on the CURRENT weights; the method's loss is then applied to that conditioning as well as to the plain one.

Notation:
  delta     `vectors`, k soft token embeddings (k = 1) placed before the student's prompt: "<erase-adv-soft0> a red
            circle". They live in the text encoder's token-embedding space, where CCE's learned token and
            UnlearnDiffAtk's prefix tokens live too, start at the (first) concept word's embedding, and are warm-started
            from step to step (the authors' choice: 30 fresh steps each outer step would be 30x the cost otherwise);
            one delta serves every concept and prompt the method cycles through.
  inner     min_delta || eps_theta(z, t, [delta; c_s]) - eps_theta0(z, t, c_s) ||^2: the current student, prompted
            with delta, should predict what the input model (theta0, the frozen copy) predicted for the concept.
            `steps` Adam steps (lr `lr`); only delta moves (torch.autograd.grad), the UNet's gradients stay untouched.
  outer     (L(z, t, c_s) + L(z, t, [delta*; c_s])) / 2, L the method's own loss on its own draw (SDD, ESD), so the
            learning rate keeps its meaning; the retain term (--preserve) is added as usual.
  steps 0   no inner loop: delta takes one step per outer step, its gradient taken from the same forward of
            eps_theta(z, t, [delta; c_s]) that the outer term back-propagates ("free" adversarial training, Shafahi et al.,
            NeurIPS 2019): the attack costs one more backward and one forward of the input model per step, not 3 x steps.
The text encoder stays loaded during training for this (SD 1.5: 123 M parameters beside the UNet's 860 M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from erase.engine.distributed import World, average_gradients
from erase.engine.sampling import predict
from erase.errors import UsageError

SOFT_TOKEN = "<erase-adv-soft{}>"


@dataclass
class AdversarialConfig:
    # inner Adam steps per outer step (AdvUnlearn: 30); 0: one step per outer step from the outer term's forward, SDD's
    # default under preservation (issue 36: it held both attacks on the shapes model at 6 UNet evaluations per step)
    steps: int = 0
    lr: float = 1e-2  # inner learning rate (AdvUnlearn: 1e-3 over 30 steps; 1e-2 for one step per outer step)
    tokens: int = 1  # k, soft prefix tokens (AdvUnlearn: 1)

    def validate(self) -> None:
        if self.steps < 0 or not 1 <= self.tokens <= 8:
            raise UsageError("--adversarial-steps must be >= 0 and the prefix 1-8 tokens")
        if self.lr <= 0:
            raise UsageError("--adversarial-lr must be > 0")


class SoftPrefixAttack:
    """The inner attack: k trainable token embeddings before the prompt, warm-started across steps."""

    def __init__(self, cfg: AdversarialConfig, text, init_word: str, *, unet, frozen, resolution: int, device, dtype, counter,
                 world: World = World()) -> None:
        from erase.embeddings import trainable_tokens

        cfg.validate()
        self.cfg, self.text, self.unet, self.frozen, self.world = cfg, text, unet, frozen, world
        self.resolution, self.device, self.dtype, self.counter = resolution, device, dtype, counter
        tokens = [SOFT_TOKEN.format(i) for i in range(cfg.tokens)]
        self.vectors = trainable_tokens(text, tokens, init_word)
        for enc in text.encoders:
            enc.to(device)
        self.prefix = " ".join(tokens)
        self.opt = torch.optim.Adam(self.vectors, lr=cfg.lr)
        # Under fp16 the backward through the UNet would underflow (a mean MSE's gradient is ~1e-6 per element): the loss
        # is scaled, dynamically, as the outer step's GradScaler does it. A step whose gradient overflowed is skipped (the
        # prefix and its Adam state stay as they were) and the scale halves.
        self.scaler = torch.amp.GradScaler(device.type if device.type in ("cuda", "cpu") else "cuda", init_scale=2.0 ** 12,
                                           enabled=dtype == torch.float16)
        self._losses: tuple[torch.Tensor, torch.Tensor] | None = None  # (first, last) inner loss of the latest attack, on the device

    @property
    def last(self) -> dict:
        """The latest attack's first and last inner losses (read on demand: no host sync per inner step)."""
        if self._losses is None:
            return {}
        return {"attack_loss_first": float(self._losses[0]), "attack_loss_last": float(self._losses[1])}

    def _step(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """One Adam step of the prefix on `loss`'s gradient (only the prefix's: the UNet's gradients are the outer step's)."""
        self._apply(torch.autograd.grad(self.scaler.scale(loss), self.vectors, retain_graph=retain_graph))

    def _apply(self, grads) -> None:
        """The prefix's Adam step on `grads`, averaged over the ranks of a data-parallel run as the weights' gradients are:
        every rank keeps the same prefix, and two ranks of batch 1 attack as one process of batch 2 does."""
        for v, g in zip(self.vectors, grads):
            v.grad = g.contiguous()  # the scaler unscales in place: an expanded (broadcast) gradient must own its memory
        average_gradients(self.vectors, self.world)  # a rank's overflow (inf) reaches every rank: all skip the step together
        self.scaler.step(self.opt)  # unscales; skips the step if the gradient is not finite
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def conditioning(self, prompt: str, b: int):
        return self.text.forward([f"{self.prefix} {prompt}"], self.device).to(self.device, self.dtype).repeat(b)

    def attack(self, d, plain_cond):
        """The attacked conditioning for draw `d` (erase.methods.base.Draw), detached, after `steps` inner steps."""
        b = d.z.shape[0]
        want = self.want(d, plain_cond)
        first = last = None
        for _ in range(self.cfg.steps):
            pred = predict(self.unet, d.z, d.t, self.conditioning(d.prompt, b), self.resolution, self.counter)
            loss = F.mse_loss(pred.float(), want)
            self._step(loss)
            self.counter.backward(b)
            first = loss.detach() if first is None else first
            last = loss.detach()
        self._losses = (first, last)
        with torch.no_grad():
            return self.conditioning(d.prompt, b)

    def want(self, d, plain_cond) -> torch.Tensor:
        """The concept as the input model draws it at the draw's latents: eps_theta0(z, t, c_s) (fp32)."""
        with torch.no_grad():
            return predict(self.unet, d.z, d.t, plain_cond, self.resolution, self.counter, weights=self.frozen).float()

    def shared(self, d, plain_cond):
        """steps 0: the attacked term on the current prefix, whose one forward also gives the prefix its step (taken once
        the outer term has been back-propagated, so the graph still holds the prefix it was built with)."""
        b = d.z.shape[0]
        want = self.want(d, plain_cond)
        pred = predict(self.unet, d.z, d.t, self.conditioning(d.prompt, b), self.resolution, self.counter)
        inner = F.mse_loss(pred.float(), want)
        grads = torch.autograd.grad(self.scaler.scale(inner), self.vectors, retain_graph=True)
        self.counter.backward(b)
        self.counter.backward(b)  # the outer term's backward
        yield F.mse_loss(pred.float(), d.target.float()) / 2
        self._apply(grads)  # the outer backward left its own gradient on the prefix: the attack's replaces it
        self._losses = (inner.detach(), inner.detach())

    def state_dict(self) -> dict:
        # read only when a state is saved (erase.engine.trainer.save_state serializes it at once): no copies needed
        return {"vectors": [v.detach().cpu() for v in self.vectors], "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for v, saved in zip(self.vectors, state["vectors"]):
                v.copy_(saved)
        self.opt.load_state_dict(state["opt"])


class Adversarial:
    """A trained method whose every step also trains on its prompt under the inner attack; seen by the trainer (and by
    the retain term's wrapper) as one method."""

    def __init__(self, method, attack: SoftPrefixAttack) -> None:
        if not method.adversarial:
            raise UsageError(f"--adversarial does not apply to --method {method.name}")
        self.method, self.attack = method, attack

    @property
    def last_draw(self):
        return self.method.last_draw

    def terms(self, step: int, teacher):
        d = self.method.last_draw = self.method.draw(step, teacher)
        yield self.method.student_loss(d) / 2
        b = d.z.shape[0]
        plain = self.method.embeddings[d.prompt].repeat(b)
        if self.attack.cfg.steps == 0:
            yield from self.attack.shared(d, plain)
            return
        attacked = self.attack.attack(d, plain)
        yield self.method.student_loss(d, attacked) / 2

    def loss(self, step: int, teacher) -> tuple[torch.Tensor, dict]:
        return sum(self.terms(step, teacher)), dict(self.attack.last)

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "attack": self.attack.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.attack.load_state_dict(state["attack"])
