"""CCE, Circumventing Concept Erasure (Pham, Marshall, Cohen, Hegde; ICLR 2024, arXiv 2308.01508).

One new token v* learned by textual inversion on the ERASED model from images of the concept (by default the base
model's own images of it, drawn with the concept in the vocabulary's templates; or the user's images):
  v* = argmin_v E_{x, t, eps} || eps - eps_theta'(z_t(x), t, c(prompt with the concept replaced by v)) ||^2
If an erasure only cut the concept's words from the model's vocabulary, v* finds another way in. The attacked prompts
are the prompt set's own, the concept's word replaced by the token (appended when the prompt lacks the word).
The inversion is HFI's (erase.feedback.invert.learn_token) with every image weighted 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erase.errors import UsageError
from erase.feedback.invert import InvertConfig, learn_token, training_prompt
from erase.generate import GenSettings, slug

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class CCEConfig:
    images: int = 25  # base images of the concept to learn from
    steps: int = 400  # inversion steps (the cap)
    lr: float = 5e-3
    batch: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.images < 1 or self.steps < 1 or self.batch < 1:
            raise UsageError("--images, --steps and the inversion batch must be >= 1")


def token_for(concept: str) -> str:
    return f"<cce-{slug(concept)}>"


def attacked_prompt(prompt: str, concept: str, token: str) -> str:
    return training_prompt(prompt, concept, token, None)


def user_images(folder: Path, dest: Path, size: int) -> list[Path]:
    """The images of `folder`, as RGB PNGs of `size` x `size` in `dest` (textual inversion takes one size)."""
    from PIL import Image

    if not folder.is_dir():
        raise UsageError(f"--concept-images {folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsageError(f"--concept-images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(paths):
        target = dest / f"{i:04d}.png"
        Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC).save(target)
        out.append(target)
    return out


def learn(erased_model, concept: str, images: list[Path], prompts: list[str], cfg: CCEConfig, settings: GenSettings, progress=None):
    """The CCE token (erase.feedback.invert.LearnedToken) on the erased model; `prompts` name the concept."""
    token = token_for(concept)
    inv = InvertConfig(token=token, init=concept, steps=cfg.steps, lr=cfg.lr, batch=cfg.batch, seed=cfg.seed, device=settings.device,
                       precision=settings.precision)
    inv.validate()
    trained = [attacked_prompt(p, concept, token) for p in prompts]
    return learn_token(erased_model, images, trained, [1.0] * len(images), inv, token=token, init=concept, progress=progress)
