"""Train the shapes-world Stable Diffusion and its detector on the CPU; save one LDM single file.

    python examples/shapes/train.py --work /tmp/shapes-work --out examples/shapes/shapes-sd.safetensors

Stages (each saves to --work and is skipped when its output exists, so a stopped run resumes):
  1. data      40k renders + captions + labels (erase.shapes), seeded
  2. detector  tiny CNN on renders + 'none' frames (erase/assets/shapes_detector.safetensors)
  3. vae       AutoencoderKL, 2 downsamples: 32x32x3 -> 8x8x4 latents; MSE + tiny KL; checked on
               held-out renders (reconstruction MSE, and the detector must still read shape and colour)
  4. clip      a tiny CLIP: CLIPTextModel + a small image CNN trained contrastively on captions and
               renders, then the text tower is frozen, as SD freezes OpenAI's CLIP. A text encoder
               frozen at random init gives near-identical embeddings for every prompt, so edits
               spread to every prompt (shared/notes/shapes-world-feasibility.md); a contrastive text
               tower gives words distinct meanings, which is what erasure relies on in real SD.
  5. unet      UNet2DConditionModel on the diffusion loss, conditioned on the frozen text tower
  5b. polish   continue stage 5 with Min-SNR-5 weighting and an EMA of the weights (exported)
  6. export    LDM-layout single file, fp16, with every component config and the training
               recipe in its metadata, so erase inspect/run/generate/evaluate read it like any checkpoint.
The real CLIP tokenizer (the project's carried files) tokenizes every caption. Every stage output records the
settings it was made with: data made with other settings is regenerated (13 s); a VAE, CLIP or UNet state made
with other settings stops the run instead of being reused.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageFilter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from erase.shapes import COLOURS, NONE, SHAPES, ShapeNet, ShapesDetector, blank, render, sample_world, to_tensor

SEED = 0
VAE = dict(block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16,
           down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, sample_size=32)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[64, 128], layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def reusable(f: Path, recipe: dict, stored: dict | None = None) -> bool:
    """True when a stage's output exists and was made with `recipe`.

    Stops on a mismatch: silently reusing an output made with other settings (a smoke test's
    20-step VAE, say) once shipped a model whose VAE had lost all colour.
    """
    if not f.exists():
        return False
    if stored is None:
        with safe_open(str(f), "pt") as h:
            stored = json.loads((h.metadata() or {}).get("recipe", "null"))
    if stored != recipe:
        raise SystemExit(f"{f} was made with {stored}, this run asks for {recipe}: delete it or use another --work")
    return True


def tokenize(captions: list[str]) -> torch.Tensor:
    from erase.models import load_tokenizer

    return load_tokenizer("sd1")(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def stage_data(work: Path, n: int) -> dict:
    f = work / "data.npz"
    recipe = {"images": n, "seed": SEED}
    if not f.exists() or json.loads(str(np.load(f)["recipe"])) != recipe:
        images, samples = sample_world(n, SEED)
        np.savez(f, images=images, captions=np.array([s.caption for s in samples]), recipe=json.dumps(recipe),
                 shape=np.array([SHAPES.index(s.shape) for s in samples]),
                 colour=np.array([list(COLOURS).index(s.colour) for s in samples]),
                 # captions like "a circle" say nothing about colour: any colour matches them
                 names_colour=np.array([s.colour in s.caption for s in samples]))
        log(f"data: {n} renders")
    d = np.load(f)
    return {k: d[k] for k in ("images", "shape", "colour", "names_colour")} | {"captions": [str(c) for c in d["captions"]]}


def held_out(n: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """Fresh renders from another seed, for every stage's check."""
    images, samples = sample_world(n, SEED + 100, empty_fraction=0.0)
    return to_tensor(images), [s.shape for s in samples], [s.colour for s in samples]


def stage_detector(out: Path, steps: int = 1500) -> None:
    if out.exists():
        return
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED + 1)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    labels = list(SHAPES) + [NONE]

    def batch(n):
        ims, ys = [], []
        for _ in range(n):
            y = rng.integers(len(labels))
            if labels[y] == NONE:
                im = blank(rng)
            else:
                im = render(labels[y], list(COLOURS)[rng.integers(len(COLOURS))], rng)
            if rng.random() < 0.5:  # decoded generations are softer than renders
                im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
            arr = np.asarray(im).astype(np.float32)
            arr = arr + rng.normal(0, rng.uniform(0, 12), arr.shape)  # generated images are noisier than renders
            ims.append(np.clip(arr, 0, 255).astype(np.uint8))
            ys.append(y)
        return to_tensor(np.stack(ims)), torch.tensor(ys)

    for step in range(steps):
        x, y = batch(64)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            log(f"detector step {step} loss {loss.item():.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(out), metadata={"trained": f"{steps} steps batch 64 AdamW 2e-3 on erase.shapes renders + blanks, seed {SEED}"})


@torch.no_grad()
def check_vae(vae) -> dict:
    """Reconstruction MSE on fresh renders, and whether the detector still reads them the same."""
    x, shapes, colours = held_out(360)
    rec = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    found = ShapesDetector().classify(rec)
    return {"val_mse": round(F.mse_loss(rec, x).item(), 5),
            "shape_kept": round(float(np.mean([f[0] == s for f, s in zip(found, shapes)])), 3),
            "colour_kept": round(float(np.mean([f[1] == c for f, c in zip(found, colours)])), 3)}


def stage_vae(work: Path, images: np.ndarray, steps: int) -> tuple[torch.nn.Module, dict]:
    from diffusers import AutoencoderKL

    f = work / "vae.safetensors"
    recipe = {"steps": steps, "batch": 64, "lr": "1e-3 cosine", "config": VAE}
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE)
    if not reusable(f, recipe):
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        g = torch.Generator().manual_seed(SEED)
        for step in range(steps):
            idx = torch.randint(len(images), (64,), generator=g)
            x = to_tensor(images[idx.numpy()]) * 2 - 1
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=g)).sample
            loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0:
                log(f"vae step {step} loss {loss.item():.4f}")
        save_file(vae.state_dict(), str(f), metadata={"recipe": json.dumps(recipe)})
    vae.load_state_dict(load_file(str(f)))
    vae.eval().requires_grad_(False)
    metrics = check_vae(vae)
    log(f"vae check on fresh renders: {metrics}")
    return vae, metrics


@torch.no_grad()
def encode_all(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 512):
        d = vae.encode(to_tensor(images[i:i + 512]) * 2 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


class ImageTower(torch.nn.Module):
    """The image half of the tiny CLIP: 32x32 RGB -> a 64-d embedding. Only used to train the text tower."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        act = torch.nn.GELU
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), act(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), act(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), act(), torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), act(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def clip_targets(shape_t, colour_t, names_colour_t, shape_i, colour_i) -> torch.Tensor:
    """match[i, j]: caption i describes image j ("a circle" matches a circle of any colour)."""
    same_shape = shape_t[:, None] == shape_i[None, :]
    colour_ok = (~names_colour_t[:, None]) | (colour_t[:, None] == colour_i[None, :])
    return (same_shape & colour_ok).float()


@torch.no_grad()
def check_clip(text, image_tower, proj) -> dict:
    """Zero-shot accuracy of the 36 "a {colour} {shape}" prompts on fresh renders, and how distinct prompts are."""
    x, shapes, colours = held_out(360)
    classes = [(s, c) for s in SHAPES for c in COLOURS]
    t = F.normalize(proj(text(tokenize([f"a {c} {s}" for s, c in classes])).pooler_output), dim=-1)
    pred = (F.normalize(image_tower(x), dim=-1) @ t.T).argmax(1)
    hits = [classes[p] == (s, c) for p, s, c in zip(pred.tolist(), shapes, colours)]

    def token_cosine(a: str, b: str) -> float:  # what cross-attention sees: all 77 positions
        h = text(tokenize([a, b])).last_hidden_state
        return round(F.cosine_similarity(h[0], h[1], dim=-1).mean().item(), 3)

    return {"zero_shot_accuracy": round(float(np.mean(hits)), 3),
            "token_cosine_circle_square": token_cosine("a red circle", "a red square"),
            "token_cosine_red_blue": token_cosine("a red circle", "a blue circle")}


def stage_clip(work: Path, data: dict, steps: int, batch: int = 256):
    """Contrastive pre-training of the text tower (soft targets: a batch holds many captions per image class)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    f = work / "clip.safetensors"
    recipe = {"steps": steps, "batch": batch, "lr": "1e-3 cosine", "config": TEXT}
    torch.manual_seed(SEED)
    text, image_tower, proj = CLIPTextModel(CLIPTextConfig(**TEXT)), ImageTower(), torch.nn.Linear(64, 64, bias=False)
    parts = torch.nn.ModuleDict({"text": text, "image": image_tower, "proj": proj})
    if not reusable(f, recipe):
        keep = np.array([c != "" for c in data["captions"]])  # empty captions carry no concept
        ids = tokenize([c for c, k in zip(data["captions"], keep) if k])
        images = data["images"][keep]
        shape, colour, names_colour = (torch.from_numpy(data[k][keep]) for k in ("shape", "colour", "names_colour"))
        logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        opt = torch.optim.AdamW(list(parts.parameters()) + [logit_scale], lr=1e-3, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        g = torch.Generator().manual_seed(SEED + 3)
        for step in range(steps):
            idx = torch.randint(len(ids), (batch,), generator=g)
            t = F.normalize(proj(text(ids[idx]).pooler_output), dim=-1)
            i = F.normalize(image_tower(to_tensor(images[idx.numpy()])), dim=-1)
            logits = logit_scale.exp().clamp(max=100) * t @ i.T
            match = clip_targets(shape[idx], colour[idx], names_colour[idx], shape[idx], colour[idx])
            loss = (-(match / match.sum(1, keepdim=True)) * logits.log_softmax(1)).sum(1).mean() / 2 \
                + (-(match.T / match.T.sum(1, keepdim=True)) * logits.T.log_softmax(1)).sum(1).mean() / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0:
                log(f"clip step {step}/{steps} loss {loss.item():.3f}")
        save_file({k: v.contiguous() for k, v in parts.state_dict().items()}, str(f), metadata={"recipe": json.dumps(recipe)})
    parts.load_state_dict(load_file(str(f)))
    parts.eval().requires_grad_(False)
    metrics = check_clip(text, image_tower, proj)
    log(f"clip check: {metrics}")
    return text, metrics


def caption_table(captions: list[str], text) -> tuple[torch.Tensor, torch.Tensor]:
    """The text tower is frozen, so each distinct caption is encoded once: (embeddings, caption -> row)."""
    unique, which = np.unique(np.array(captions), return_inverse=True)
    with torch.no_grad():
        table = torch.cat([text(tokenize(list(unique[i:i + 256]))).last_hidden_state for i in range(0, len(unique), 256)])
    return table, torch.from_numpy(which.reshape(-1))


def resume(ckpt: Path, recipe: dict, g: torch.Generator, **loaders) -> int:
    """Continue a training stage from its checkpoint: each saved part handed to its loader (None: not kept), the sample
    generator restored; the step to go on from (0 without a checkpoint). A checkpoint of another recipe stops the run."""
    if not ckpt.exists():
        return 0
    st = torch.load(ckpt, weights_only=True)
    reusable(ckpt, recipe, stored=json.loads(st["recipe"]))
    for name, load in loaders.items():
        if load is not None:
            load(st[name])
    g.set_state(st["gen"])
    log(f"{ckpt.stem}: resumed at step {st['step']}")
    return st["step"]


def save_stage(ckpt: Path, recipe: dict, step: int, g: torch.Generator, **states) -> None:
    """A training stage's checkpoint, as `resume` reads it."""
    torch.save({**states, "gen": g.get_state(), "step": step, "recipe": json.dumps(recipe)}, ckpt)


def train_unet(ckpt: Path, unet, recipe: dict, latents, captions: tuple, *, steps: int, batch: int, scaling: float,
               lr: float, warmup: int, seed: int, min_snr: float = 0.0, ema_decay: float = 0.0):
    """The diffusion loss on (latent, caption) pairs; resumable from `ckpt`. Returns the EMA when ema_decay > 0.

    min_snr > 0 weights each sample by min(SNR, gamma) / SNR (Min-SNR-gamma, Hang et al. 2023): the
    low-noise steps, which only sharpen edges, stop dominating the gradient, and the high-noise
    steps, where the shape is decided, get more of it.
    """
    from diffusers import DDPMScheduler

    from erase.engine.trainer import EMA

    table, which = captions
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    noise_sched = DDPMScheduler(**SCHEDULER)
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    params = dict(unet.named_parameters())
    ema = EMA(params, ema_decay) if ema_decay else None
    g = torch.Generator().manual_seed(seed)
    start = resume(ckpt, recipe, g, unet=unet.load_state_dict, ema=ema.load if ema is not None else None, opt=opt.load_state_dict,
                   sched=sched.load_state_dict)
    mean, std = latents
    t0 = time.time()
    for step in range(start, steps):
        idx = torch.randint(len(which), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        err = (unet(zt, t, encoder_hidden_states=table[which[idx]]).sample - noise).pow(2).mean((1, 2, 3))
        loss = (err * snr[t].clamp(max=min_snr) / snr[t]).mean() if min_snr else err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        if step % 50 == 0:
            log(f"{ckpt.stem} step {step}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step - start + 1):.2f}s/step)")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_stage(ckpt, recipe, step + 1, g, unet=unet.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                       **({"ema": ema.shadow} if ema is not None else {}))
    if ema is not None:
        unet.load_state_dict(ema.shadow)  # the EMA is the result
    return unet


UNET_LR = "5e-4 AdamW wd 1e-2, 200 warm-up, cosine"  # stage 5's schedule, as its recipe and the export record it


def stage_unet(work: Path, latents, captions: tuple, steps: int, batch: int, scaling: float):
    from diffusers import UNet2DConditionModel

    recipe = {"steps": steps, "batch": batch, "lr": UNET_LR, "config": UNET}
    torch.manual_seed(SEED)
    return train_unet(work / "unet_state.pt", UNet2DConditionModel(**UNET), recipe, latents, captions, steps=steps,
                      batch=batch, scaling=scaling, lr=5e-4, warmup=200, seed=SEED + 2)


POLISH = {"lr": 2e-4, "warmup": 50, "min_snr": 5.0, "ema_decay": 0.998}


def stage_polish(work: Path, unet, latents, captions: tuple, steps: int, batch: int, scaling: float, after: int):
    """Stage 5b: continue from stage 5's weights with Min-SNR-5 weighting, and keep an EMA of the weights.

    Stage 5 alone drew squares as circles (square prompts 0.15 accurate); 600 more steps at lr 1e-4
    moved squares to 0.62 and hearts from 0.67 to 0.33 (24 images per shape): the weights were still
    wandering between shapes, which is what an EMA of the weights averages out. With this stage's
    settings (1,500 steps) squares reach 0.83 and hearts 1.00 (same 24 images; benchmarks/README.md
    has the 48-image calibration).
    """
    recipe = {"steps": steps, "batch": batch, "from": f"stage 5 after {after} steps", "lr": f"{POLISH['lr']:g} AdamW wd 1e-2, "
              f"{POLISH['warmup']} warm-up, cosine", "min_snr_gamma": POLISH["min_snr"], "ema_decay": POLISH["ema_decay"]}
    return train_unet(work / "unet_polish.pt", unet, recipe, latents, captions, steps=steps, batch=batch, scaling=scaling,
                      lr=POLISH["lr"], warmup=POLISH["warmup"], seed=SEED + 4, min_snr=POLISH["min_snr"], ema_decay=POLISH["ema_decay"])


def export(out: Path, vae, unet, text, scaling: float, recipe: dict) -> None:
    from erase.tiny import ldm_state_dict

    state = ldm_state_dict("sd1", {"unet": unet, "vae": vae, "text_encoder": text})
    state = {k: v.detach().half().contiguous() for k, v in state.items() if not k.endswith("position_ids")}
    meta = {
        "erase.model.unet": json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}, default=list),
        "erase.model.vae": json.dumps({**{k: v for k, v in vae.config.items() if not k.startswith("_")}, "scaling_factor": scaling}, default=list),
        "erase.model.text_encoder": json.dumps(TEXT),
        "erase.model.scheduler": json.dumps({**SCHEDULER, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
        "modelspec.title": "erase shapes-world SD (tiny)",
        "modelspec.prediction_type": "epsilon",
        "shapes.training": json.dumps(recipe),
    }
    save_model(out, state, meta)


def save_model(out: Path, state: dict, meta: dict) -> None:
    """The exported file, whole or not at all."""
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/shapes-work"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "shapes-sd.safetensors")
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--clip-steps", type=int, default=1000)
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--polish-steps", type=int, default=1500, help="stage 5b; 0 exports stage 5's weights")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = stage_data(args.work, args.images)
    from erase.shapes import DETECTOR_PATH

    stage_detector(DETECTOR_PATH)
    vae, vae_metrics = stage_vae(args.work, data["images"], args.vae_steps)
    text, clip_metrics = stage_clip(args.work, data, args.clip_steps)
    mean, std = encode_all(vae, data["images"])
    scaling = float(1.0 / mean.std())
    log(f"latent std {mean.std():.3f} -> scaling_factor {scaling:.4f}")
    captions = caption_table(data["captions"], text)
    unet = stage_unet(args.work, (mean, std), captions, args.unet_steps, args.batch, scaling)
    if args.polish_steps:
        unet = stage_polish(args.work, unet, (mean, std), captions, args.polish_steps, args.batch, scaling, args.unet_steps)
    recipe = {"images": args.images, "seed": SEED, "vae_steps": args.vae_steps, "vae_check": vae_metrics,
              "clip_steps": args.clip_steps, "clip_batch": 256, "clip_check": clip_metrics,
              "text_encoder": "tiny CLIP text tower trained contrastively on the captions and renders, then frozen",
              "unet_steps": args.unet_steps, "batch": args.batch, "unet_lr": UNET_LR,
              "polish_steps": args.polish_steps, "polish": POLISH | {"exported": "EMA weights"} if args.polish_steps else None,
              "objective": "epsilon, scaled_linear betas, 1000 steps", "wall_seconds_this_session": round(time.time() - t0)}
    export(args.out, vae, unet.eval(), text, scaling, recipe)


if __name__ == "__main__":
    main()
