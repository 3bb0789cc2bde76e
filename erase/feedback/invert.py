"""Reward-weighted textual inversion: condense what labellers flagged into one new token (HFI's second step).

Notation (HFI, Kim et al. 2024, Sec. 3; textual inversion, Gal et al. 2022):
  v*         `vectors`, the new token's embedding (one row per text encoder), initialised from a word
  x_i, r_i   the labelled images and their rewards (erase.feedback.reward)
  z_0        the VAE latent of x_i (mean of the posterior, times the VAE's scaling factor)
  c_i(v*)    the image's own prompt with the concept's words replaced by the token ("a circle" -> "a <red-circle>")
  L(v*)      sum_i r_i E_{t, eps} || eps - eps_theta(sqrt(a_t) z_0 + sqrt(1 - a_t) eps, t, c_i(v*)) ||^2 / sum_i r_i
             (the velocity instead of eps for v-prediction models)
Only v* is trained: the UNet, the VAE and every other row of the token table are frozen. Each step draws `batch`
images with probability r_i / sum r (an unbiased estimate of the weighted loss that spends no compute on images
with reward 0) and t uniformly from the 1000 training timesteps or, with `timesteps = "beta"`, t/1000 ~ Beta(3, 3).
The loop is the erasures' own trainer (erase.engine.trainer): the same autocast regions, loss scaling under fp16,
NaN guard and gradient checkpointing, with the token as its only trainable parameter (no EMA, no clipping).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from erase.embeddings import Embedding, check_token, save_embedding, trainable_tokens
from erase.engine.device import resolve_device, resolve_precision
from erase.engine.noise import forward_process, noise_scheduler
from erase.engine.sampling import beta_weights, predict
from erase.errors import UsageError
from erase.feedback.collect import IMAGES, read_collection
from erase.feedback.reward import rewards
from erase.generate import slug
from erase.vocabulary import without


@dataclass
class InvertConfig:
    token: str | None = None  # default "<concept>", e.g. <red-circle>
    init: str | None = None  # the word v* starts from (its tokens' mean); default the collection's concept
    steps: int = 500
    lr: float = 5e-3  # textual inversion's usual rate for a single embedding (Gal et al.)
    batch: int = 4
    timesteps: str = "uniform"  # "uniform" or "beta" (Beta(3, 3) over the training timesteps)
    template: str | None = None  # e.g. "a photo of {}"; default: each image's own prompt with the concept replaced
    labels: str = "auto"  # "binary", "rank" or "auto"
    top: int | None = None  # only the `top` images with the highest reward
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False  # recompute the UNet's activations in the backward (SDXL at 1024 px)
    reward_model: str | None = None  # "clip:PATH": rewards for unlabelled images too, from a head fitted on CLIP features

    def validate(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise UsageError("--steps and --batch must be >= 1")
        if self.lr <= 0:
            raise UsageError("--lr must be > 0")
        if self.timesteps not in ("uniform", "beta"):
            raise UsageError("--timesteps must be uniform or beta")
        if self.template is not None and self.template.count("{}") != 1:
            raise UsageError("--template must hold the token as exactly one {}, e.g. 'a photo of {}'")
        if self.top is not None and self.top < 1:
            raise UsageError("--top must be >= 1")
        if self.token is not None:
            check_token(self.token)
        if self.reward_model is not None:
            from erase.feedback.reward_model import parse

            parse(self.reward_model)


def training_prompt(prompt: str, concept: str, token: str, template: str | None) -> str:
    if template is not None:
        return template.replace("{}", token)
    if concept in prompt:
        return without(prompt, concept, token)
    return f"{prompt}, {token}"


def weighted_images(folder: Path, cfg: InvertConfig) -> tuple[list[dict], str, dict]:
    """Manifest rows with reward > 0 (their `reward` added), highest first; the label kind used; how the rewards were
    made (the labels alone, or a reward model fitted to them that also scores the unlabelled images)."""
    from erase.feedback.labels import answers

    _, rows = read_collection(folder)
    found, kind = rewards(answers(folder), cfg.labels)
    record = {"source": "labels"}
    if cfg.reward_model is not None:
        from erase.feedback.reward_model import model_rewards

        found, record = model_rewards(cfg.reward_model, {r["image"]: folder / IMAGES / r["image"] for r in rows}, found)
    chosen = sorted(({**r, "reward": found[r["image"]]} for r in rows if found.get(r["image"], 0) > 0), key=lambda r: -r["reward"])
    return (chosen[: cfg.top] if cfg.top else chosen), kind, record


@torch.no_grad()
def encode_pixels(vae, pixels: np.ndarray, device) -> torch.Tensor:
    """The latents (means) of uint8 RGB images (B, H, W, 3), shifted and scaled as the denoiser reads them."""
    x = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2).to(device) / 127.5 - 1
    shift = vae.config.get("shift_factor") or 0.0  # SD3's and FLUX.1's latents are shifted as well as scaled
    return (vae.encode(x).latent_dist.mean - shift) * vae.config.scaling_factor


def encode_images(vae, paths: list[Path], device, batch: int = 8) -> torch.Tensor:
    return torch.cat([encode_pixels(vae, np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[i : i + batch]]), device)
                      for i in range(0, len(paths), batch)])


class TokenLoss:
    """The reward-weighted denoising loss of the token, one batch per call, for the shared trainer."""

    def __init__(self, unet, scheduler, text, z0: torch.Tensor, prompts: list[str], rewards: list[float], *, batch: int, timesteps: str,
                 resolution: int, device, dtype, generator: torch.Generator) -> None:
        self.unet, self.text, self.z0, self.prompts = unet, text, z0, prompts
        self.batch, self.resolution, self.device, self.dtype = batch, resolution, device, dtype
        self.weights = torch.tensor(rewards, dtype=torch.float64)
        T = scheduler.config.num_train_timesteps
        self.t_weights = beta_weights(T) if timesteps == "beta" else torch.ones(T)
        self.noise = forward_process(scheduler)
        self.generator = generator

    def loss(self, step: int, teacher) -> tuple[torch.Tensor, dict]:
        gen = self.generator
        pick = torch.multinomial(self.weights, self.batch, replacement=True, generator=gen)  # images by reward
        t = torch.multinomial(self.t_weights, self.batch, replacement=True, generator=gen)
        z0 = self.z0[pick]
        noise = torch.randn(z0.shape, generator=gen).to(self.device)
        z_t, target = self.noise.noised(z0, noise, t.to(self.device))
        cond = self.text.forward([self.prompts[i] for i in pick.tolist()], self.device).to(self.device, self.dtype)
        pred = predict(self.unet, z_t.to(self.dtype), self.noise.timestep(t.to(self.device)), cond, self.resolution)
        return F.mse_loss(pred.float(), target.float()), {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class LearnedToken:
    """What `learn_token` returns: the token's vectors (one (1, D) row per text encoder) and how they were learned."""

    token: str
    vectors: list[torch.Tensor]
    init_vectors: list[torch.Tensor]
    curve: list[list[float]]
    seconds: float
    device: str
    precision: str
    dtype: torch.dtype
    unet_evals: int  # UNet forward passes over single images (batch x steps)

    @property
    def relative_change(self) -> list[float]:
        return [float((v - v0.cpu()).norm() / v0.norm()) for v, v0 in zip(self.vectors, self.init_vectors)]


def learn_token(model, images: list[Path], prompts: list[str], weights: list[float], cfg: InvertConfig, *, token: str, init: str,
                progress=None) -> LearnedToken:
    """Textual inversion of one token on `model` (an opened checkpoint) from `images` (one size, a multiple of the latent
    factor), each trained with its prompt (which holds `token`) and drawn in proportion to its weight. Shared by HFI's
    `invert` (weights = rewards) and the CCE attack (`erase attack`, every weight 1)."""
    from erase.engine.trainer import TrainConfig, Trainer

    device = resolve_device(cfg.device)
    dtype, autocast_dtype, precision = resolve_precision(cfg.precision, device)
    size = {Image.open(p).size for p in images}
    if len(size) != 1 or next(iter(size))[0] % model.latent_factor:
        raise UsageError(f"the images must share one size that is a multiple of {model.latent_factor} (found {sorted(size)})")
    resolution = next(iter(size))[0]

    vae = model.load_vae(dtype=torch.float32, device=device)
    z0 = encode_images(vae, images, device)
    del vae

    text = model.load_text_encoder()
    vectors = trainable_tokens(text, [token], init)  # one (1, D) row per text encoder, from the word `init`
    init_vectors = [v.detach().clone() for v in vectors]
    for enc in text.encoders:
        enc.to(device)
    unet = model.load_unet(dtype=dtype, device=device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    loss = TokenLoss(unet, noise_scheduler(model, resolution), text, z0, prompts, weights, batch=cfg.batch,
                     timesteps=cfg.timesteps, resolution=resolution,
                     device=device, dtype=dtype, generator=torch.Generator().manual_seed(cfg.seed))
    train = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=0.0, grad_clip=math.inf, ema_decay=0.0, seed=cfg.seed, log_every=1)
    trainer = Trainer(train, loss, {f"token.{i}": v for i, v in enumerate(vectors)}, generator=loss.generator, device=device,
                      autocast_dtype=autocast_dtype, run_config={}, state_dir=None)
    t0 = time.perf_counter()
    trainer.train((lambda p: progress(p.step, p.loss)) if progress else None)
    return LearnedToken(token=token, vectors=[v.detach().cpu().float() for v in vectors], init_vectors=init_vectors,
                        curve=[[step, round(value, 6)] for step, value, _ in trainer.curve], seconds=time.perf_counter() - t0,
                        device=str(device), precision=precision, dtype=dtype, unet_evals=cfg.steps * cfg.batch)


def invert(folder: Path, model_path: Path, out: Path, cfg: InvertConfig, *, force: bool = False, progress=None,
           text_encoders: Path | None = None) -> dict:
    """Learn the token from `folder`'s labels on `model_path`; write `out` (A1111 / diffusers embedding) and a report.
    `text_encoders`: an SD3 / FLUX.1 file's diffusers folder (default: the one the collection was drawn with)."""
    from erase.checkpoint.write import report_path, sha256_file
    from erase.transformer_model import open_any_model

    cfg.validate()
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    if out.suffix != ".safetensors":
        raise UsageError("--out must be a .safetensors file")
    info, _ = read_collection(folder)
    concept = info["concept"]
    token = cfg.token or f"<{slug(concept)}>"
    init = cfg.init or concept
    images, kind, reward_record = weighted_images(folder, cfg)
    text_encoders = text_encoders or (Path(info["text_encoders"]) if info.get("text_encoders") else None)
    model = open_any_model(model_path, text_encoders=text_encoders, command="feedback invert")
    model_sha = sha256_file(model_path)
    prompts = [training_prompt(r["prompt"], concept, token, cfg.template) for r in images]
    rewards = [r["reward"] for r in images]
    learned = learn_token(model, [folder / IMAGES / r["image"] for r in images], prompts, rewards, cfg, token=token, init=init,
                          progress=progress)
    curve = learned.curve
    labels_sha = sha256_file(folder / "labels.jsonl")
    meta = {"erase.kind": "embedding", "erase.concept": concept, "erase.init": init, "erase.labels": kind,
            "erase.labels_sha256": labels_sha, "erase.model_sha256": model_sha, "erase.steps": str(cfg.steps),
            "erase.reward": reward_record["source"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_embedding(Embedding(token, learned.vectors), out, meta)
    report = {"output": str(out), "token": token, "init": init, "concept": concept, "collection": str(folder), "labels": kind,
              "labels_sha256": labels_sha, "reward": reward_record, "model": str(model_path), "model_sha256": model_sha,
              "text_encoders": str(text_encoders) if text_encoders else None,
              "same_model_as_collection": model_sha == info.get("model_sha256"), "images_used": len(images),
              "images_in_collection": info.get("images"), "reward_sum": float(sum(rewards)),
              "top_images": [{"image": r["image"], "prompt": r["prompt"], "reward": r["reward"]} for r in images[:10]],
              "config": asdict(cfg), "device": learned.device, "precision": learned.precision, "seconds": learned.seconds,
              "weights": ("trained token in fp32; UNet and text encoder frozen in " + str(learned.dtype).removeprefix("torch.")),
              "seconds_per_step": learned.seconds / cfg.steps, "relative_change_from_init": learned.relative_change, "loss_curve": curve,
              "final_loss_mean_last_50": float(np.mean([c[1] for c in curve[-50:]]))}
    report_file = report_path(out)
    report_file.write_text(json.dumps(report, indent=2))
    report["report"] = str(report_file)
    return report
