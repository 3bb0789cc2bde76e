"""The shapes world: a synthetic text-to-image domain small enough to train and measure on a CPU.

One shape (circle, square, triangle, star, cross, heart) in one colour on a plain light
background, at a random position, size and rotation; captions from a few templates. The
project's tiny Stable Diffusion (examples/shapes/) is trained on it, and `ShapesDetector`
(a tiny CNN trained on renders, plus nearest-colour matching) names the shape and colour of
a generated image, so erasure can be measured: "does a circle prompt still draw a circle?".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS = {  # name -> reference RGB
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 120, 10),
}
TEMPLATES = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on a white background",
    "a drawing of a {shape} in {colour}",
    "a {shape}",
    "{shape}",
)
NONE = "none"  # detector outcome when no clean shape is visible
SIZE = 32
DETECTOR_PATH = Path(__file__).parent / "assets" / "shapes_detector.safetensors"


@dataclass(frozen=True)
class Sample:
    shape: str
    colour: str
    caption: str


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def pts(radii, n, offset=0.0):
        return [(cx + radii[i % len(radii)] * r * math.cos(rot + offset + 2 * math.pi * i / n),
                 cy + radii[i % len(radii)] * r * math.sin(rot + offset + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "square":
        return pts([1.0], 4, math.pi / 4)
    if shape == "triangle":
        return pts([1.0], 3, -math.pi / 2)
    if shape == "star":
        return pts([1.0, 0.45], 10, -math.pi / 2)
    if shape == "cross":
        w = 0.36
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif shape == "heart":
        base = [(16 * math.sin(a) ** 3 / 16, -(13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)) / 16)
                for a in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    else:
        raise ValueError(shape)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in base]


def render(shape: str, colour: str, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """One image: drawn at 4x, downscaled (anti-aliased), with colour and background jitter."""
    scale = 4
    big = size * scale
    bg = (255, 255, 255) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(225, 246, 3))
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(6.5, 12.5) * scale
    margin = r + scale
    cx, cy = rng.uniform(margin, big - margin, 2)
    rot = rng.uniform(0, 2 * math.pi)
    rgb = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=rgb)
    return img.resize((size, size), Image.LANCZOS)


def sample_world(n: int, seed: int, empty_fraction: float = 0.1) -> tuple[np.ndarray, list[Sample]]:
    """n images as uint8 (n, 32, 32, 3) and their samples; `empty_fraction` captions are "" (for CFG)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    samples = []
    colours = list(COLOURS)
    for i in range(n):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))]
        images[i] = np.asarray(render(shape, colour, rng))
        caption = "" if rng.random() < empty_fraction else TEMPLATES[rng.integers(len(TEMPLATES))].format(shape=shape, colour=colour)
        samples.append(Sample(shape, colour, caption))
    return images, samples


def blank(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """A frame with no clean shape (background, smudges, noise): the detector's 'none' class."""
    bg = rng.integers(200, 256, 3)
    arr = np.ones((size, size, 3)) * bg
    kind = rng.integers(3)
    if kind == 1:  # noise texture
        arr = arr + rng.normal(0, rng.uniform(5, 40), arr.shape)
    elif kind == 2:  # soft coloured blob smear
        yy, xx = np.mgrid[:size, :size]
        for _ in range(rng.integers(1, 4)):
            cx, cy, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 10)
            w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))[..., None] * rng.uniform(0.2, 0.6)
            arr = arr * (1 - w) + w * rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


class ShapeNet(torch.nn.Module):
    """Tiny CNN: 32x32 RGB -> len(SHAPES) + 1 logits (the last one is NONE)."""

    def __init__(self) -> None:
        super().__init__()
        c = 32
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c, 2 * c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        )
        self.head = torch.nn.Linear(2 * c * 4, len(SHAPES) + 1)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, 32, 32) 'ink' map: distance from the background colour.

        Working on ink rather than RGB makes the shape classifier colour-blind, so it cannot
        learn to name a shape from its colour.
        """
        if images.shape[-1] != SIZE:
            images = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
        bg = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
        return (images - bg).abs().amax(dim=1, keepdim=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.preprocess(images)).flatten(1))


def to_tensor(images) -> torch.Tensor:
    """uint8 (B, H, W, 3) array / list of PIL images -> float (B, 3, H, W) in [0, 1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def dominant_colour(images: torch.Tensor) -> list[str]:
    """Name the colour of the most saturated pixels (nearest reference colour), per image."""
    names = list(COLOURS)
    ref = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) / 255.0  # (C, 3)
    out = []
    for im in images:  # (3, H, W)
        px = im.flatten(1).T  # (HW, 3)
        sat = px.amax(1) - px.amin(1)
        top = px[sat >= 0.7 * sat.max()]  # the shape's own pixels, not the (slightly tinted) background
        mean = top.mean(0)
        out.append(names[int(((ref - mean) ** 2).sum(1).argmin())])
    return out


class ShapesDetector:
    """Names shape (or NONE) and colour of images; weights ship with the package."""

    name = "shapes"

    def __init__(self, weights: Path = DETECTOR_PATH, min_confidence: float = 0.5) -> None:
        from safetensors.torch import load_file

        self.net = ShapeNet()
        self.net.load_state_dict(load_file(str(weights)))
        self.net.eval()
        self.min_confidence = min_confidence

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> list[tuple[str, str, float]]:
        """(B, 3, H, W) in [0, 1] -> [(shape or 'none', colour, confidence)]."""
        probs = self.net(images).softmax(-1)
        conf, idx = probs.max(-1)
        labels = list(SHAPES) + [NONE]
        colours = dominant_colour(images)
        return [(labels[i] if c >= self.min_confidence else NONE, col, float(c)) for i, c, col in zip(idx.tolist(), conf, colours)]
