"""HFI's reward model: a small head on a local CLIP model's image features, fitted to the labels, scoring every image of
the collection (Kim et al. 2024, Sec. 3.2: a few hundred labels extended to all the images the model drew).

  f(x)      the CLIP image embedding of x (the projection's output, unit length), from `clip:PATH`, a local CLIP folder
            (transformers' CLIPModel or CLIPVisionModelWithProjection layout; nothing is downloaded)
  r(x)      the label-derived reward of a labelled image (erase.feedback.reward: the share of labellers, or the
            Bradley-Terry score), in [0, 1]
  head      p(x) = sigmoid(w . f(x) + b), fitted by full-batch L-BFGS to the soft targets r(x) (binary cross-entropy)
            with an L2 penalty on w
Labelled images keep their labels' reward; every other image of the collection gets p(x) when p(x) >= 0.5 (the head
calls it harmful) and 0 otherwise, so the inversion learns from the images the labels would have flagged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from erase.errors import UsageError

PREFIX = "clip:"


def parse(spec: str) -> Path:
    if not spec.startswith(PREFIX):
        raise UsageError(f"--reward-model must be clip:PATH (a local CLIP folder), not {spec!r}")
    path = Path(spec[len(PREFIX):])
    if not (path / "config.json").exists():
        raise UsageError(f"--reward-model {spec}: {path} is not a CLIP model folder (no config.json)")
    return path


@torch.no_grad()
def image_features(path: Path, images: list[Path], batch: int = 32) -> torch.Tensor:
    """Unit-length CLIP image embeddings (n, d) of `images`."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
        processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"--reward-model: cannot load a CLIP vision model from {path} ({str(e).splitlines()[0]})") from None
    out = []
    for i in range(0, len(images), batch):
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images[i : i + batch]], return_tensors="pt").pixel_values
        out.append(torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds.float(), dim=-1))
    return torch.cat(out)


class RewardHead:
    """p(x) = sigmoid(w . f + b), fitted to soft targets in [0, 1]."""

    def __init__(self, dim: int, l2: float = 1e-3) -> None:
        self.w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        self.l2 = l2

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.double() @ self.w + self.b

    def fit(self, features: torch.Tensor, targets: torch.Tensor, iterations: int = 200) -> float:
        """Fit to `targets`; returns the final loss."""
        # the features are unit vectors with small differences: scaling them lets the head reach confident outputs
        opt = torch.optim.LBFGS([self.w, self.b], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")
        y = targets.double()

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.logits(features), y) + self.l2 * (self.w ** 2).sum()
            loss.backward()
            return loss

        return float(opt.step(closure))

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features)).float()


def model_rewards(spec: str, images: dict[str, Path], labelled: dict[str, float]) -> tuple[dict[str, float], dict]:
    """Rewards for every image in `images` (name -> file): labelled ones keep theirs, the rest get the head's p(x) when
    p(x) >= 0.5. Also the record of the fit for the report."""
    path = parse(spec)
    known = [n for n in images if n in labelled]
    if len({labelled[n] >= 0.5 for n in known}) < 2:
        raise UsageError("--reward-model needs labelled images of both kinds (some flagged, some not) to fit its head")
    names = list(images)
    features = image_features(path, [images[n] for n in names])
    index = {n: i for i, n in enumerate(names)}
    train = features[[index[n] for n in known]]
    targets = torch.tensor([labelled[n] for n in known])
    head = RewardHead(features.shape[1])
    # unit-length features differ by little; a fixed scale (CLIP's own logit scale, 100) keeps the L2 penalty meaningful
    loss = head.fit(train * 100, targets)
    p = head.predict(features * 100)
    fitted = p[[index[n] for n in known]]
    agree = float(((fitted >= 0.5) == (targets >= 0.5)).float().mean())
    rewards = {n: labelled[n] if n in labelled else (float(p[index[n]]) if p[index[n]] >= 0.5 else 0.0) for n in names}
    record = {"source": spec, "labelled": len(known), "scored": len(names) - len(known),
              "flagged_by_head": sum(1 for n in names if n not in labelled and p[index[n]] >= 0.5),
              "train_agreement": agree, "train_loss": loss}
    return rewards, record
