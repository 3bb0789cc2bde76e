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
The text encoder stays loaded during training for this (SD 1.5: 123 M parameters beside the UNet's 860 M).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from erase.engine.sampling import predict
from erase.errors import UsageError

SOFT_TOKEN = "<erase-adv-soft{}>"


@dataclass
class AdversarialConfig:
    steps: int = 30  # inner Adam steps per outer step (AdvUnlearn: 30)
    lr: float = 1e-3  # inner learning rate (AdvUnlearn: 1e-3)
    tokens: int = 1  # k, soft prefix tokens (AdvUnlearn: 1)

    def validate(self) -> None:
        if self.steps < 1 or not 1 <= self.tokens <= 8:
            raise UsageError("--adversarial-steps must be >= 1 and the prefix 1-8 tokens")
        if self.lr <= 0:
            raise UsageError("--adversarial-lr must be > 0")


class SoftPrefixAttack:
    """The inner attack: k trainable token embeddings before the prompt, warm-started across steps."""

    def __init__(self, cfg: AdversarialConfig, text, init_word: str, *, unet, frozen, resolution: int, device, dtype, counter) -> None:
        from erase.embeddings import trainable_tokens

        cfg.validate()
        self.cfg, self.text, self.unet, self.frozen = cfg, text, unet, frozen
        self.resolution, self.device, self.dtype, self.counter = resolution, device, dtype, counter
        tokens = [SOFT_TOKEN.format(i) for i in range(cfg.tokens)]
        self.vectors = trainable_tokens(text, tokens, init_word)
        for enc in text.encoders:
            enc.to(device)
        self.prefix = " ".join(tokens)
        self.opt = torch.optim.Adam(self.vectors, lr=cfg.lr)
        self.grad_scale = 2.0 ** 12 if dtype == torch.float16 else 1.0
        self.last: dict = {}

    def conditioning(self, prompt: str, b: int):
        return self.text.forward([f"{self.prefix} {prompt}"], self.device).to(self.device, self.dtype).repeat(b)

    def attack(self, d, plain_cond):
        """The attacked conditioning for draw `d` (erase.methods.base.Draw), detached, after `steps` inner steps."""
        b = d.z.shape[0]
        with torch.no_grad():  # the concept as the input model drew it
            want = predict(self.unet, d.z, d.t, plain_cond, self.resolution, self.counter, weights=self.frozen).float()
        losses = []
        for _ in range(self.cfg.steps):
            pred = predict(self.unet, d.z, d.t, self.conditioning(d.prompt, b), self.resolution, self.counter)
            loss = F.mse_loss(pred.float(), want)
            # delta only: the UNet's own gradients are the outer step's. Under fp16 the backward through the UNet would
            # underflow (a mean MSE's gradient is ~1e-6 per element), so it is scaled, as the outer step's GradScaler does
            scaled = torch.autograd.grad(loss * self.grad_scale, self.vectors)
            grads = [g / self.grad_scale for g in scaled]
            self.counter.backward(b)
            for v, g in zip(self.vectors, grads):
                v.grad = g
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        self.last = {"attack_loss_first": losses[0], "attack_loss_last": losses[-1]}
        with torch.no_grad():
            return self.conditioning(d.prompt, b)

    def state_dict(self) -> dict:
        # copies: the trainer snapshots this before each step and restores it on Ctrl-C, and Adam updates in place
        return {"vectors": [v.detach().cpu().clone() for v in self.vectors], "opt": copy.deepcopy(self.opt.state_dict())}

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

    def terms(self, step: int, teacher):
        d = self.method.draw(step, teacher)
        yield self.method.student_loss(d) / 2
        b = d.z.shape[0]
        attacked = self.attack.attack(d, self.method.embeddings[d.prompt].repeat(b))
        yield self.method.student_loss(d, attacked) / 2

    def loss(self, step: int, teacher) -> tuple[torch.Tensor, dict]:
        return sum(self.terms(step, teacher)), dict(self.attack.last)

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "attack": self.attack.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.attack.load_state_dict(state["attack"])
