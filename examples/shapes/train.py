"""Train the shapes-world Stable Diffusion and its detector on the CPU; save one LDM single file.

    python examples/shapes/train.py --work /tmp/shapes-work --out examples/shapes/shapes-sd.safetensors

Stages (each saves to --work and is skipped when its output exists, so a stopped run resumes):
  1. data      40k renders + captions (erase.shapes), seeded
  2. detector  tiny CNN on renders + 'none' frames (erase/assets/shapes_detector.safetensors)
  3. vae       AutoencoderKL, 2 downsamples: 32x32x3 -> 8x8x4 latents; MSE + tiny KL
  4. unet      UNet2DConditionModel and CLIPTextModel trained *jointly* on the diffusion loss,
               then both frozen (as SD's text encoder is). A text encoder frozen at random init
               gives near-identical embeddings for every prompt, so edits spread to every
               prompt (shared/notes/shapes-world-feasibility.md); joint training gives the words
               distinct meanings, which is what erasure relies on in real SD.
  5. export    LDM-layout single file, fp16, with every component config and the training
               recipe in its metadata, so erase inspect/run/generate/evaluate read it like any checkpoint.
The real CLIP tokenizer (the project's carried files) tokenizes every caption.
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
from safetensors.torch import load_file, save_file

from erase.shapes import COLOURS, NONE, SHAPES, ShapeNet, blank, render, sample_world, to_tensor

SEED = 0
VAE = dict(block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16,
           down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, sample_size=32)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[64, 128], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def stage_data(work: Path, n: int) -> tuple[np.ndarray, list[str]]:
    f = work / "data.npz"
    if not f.exists():
        images, samples = sample_world(n, SEED)
        np.savez(f, images=images, captions=np.array([s.caption for s in samples]))
        log(f"data: {n} renders")
    d = np.load(f)
    return d["images"], [str(c) for c in d["captions"]]


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


def stage_vae(work: Path, images: np.ndarray, steps: int):
    from diffusers import AutoencoderKL

    f = work / "vae.safetensors"
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**VAE)
    if f.exists():
        vae.load_state_dict(load_file(str(f)))
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
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
        if step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
    save_file(vae.state_dict(), str(f))
    return vae


@torch.no_grad()
def encode_all(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 512):
        d = vae.encode(to_tensor(images[i:i + 512]) * 2 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def stage_unet(work: Path, latents, captions: list[str], steps: int, batch: int, scaling: float):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.models import load_tokenizer

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    tok = load_tokenizer("sd1")
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    noise_sched = DDPMScheduler(**SCHEDULER)
    g = torch.Generator().manual_seed(SEED + 2)
    start = 0
    ckpt = work / "unet_state.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["gen"])
        start = st["step"]
        log(f"unet: resumed at step {start}")
    mean, std = latents
    t0 = time.time()
    for step in range(start, steps):
        idx = torch.randint(len(captions), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text(ids[idx]).last_hidden_state
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step - start + 1):.2f}s/step)")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": g.get_state(), "step": step + 1}, ckpt)
    return unet, text


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
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/shapes-work"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "shapes-sd.safetensors")
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, captions = stage_data(args.work, args.images)
    from erase.shapes import DETECTOR_PATH

    stage_detector(DETECTOR_PATH)
    vae = stage_vae(args.work, images, args.vae_steps).eval().requires_grad_(False)
    mean, std = encode_all(vae, images)
    scaling = float(1.0 / mean.std())
    log(f"latent std {mean.std():.3f} -> scaling_factor {scaling:.4f}")
    unet, text = stage_unet(args.work, (mean, std), captions, args.unet_steps, args.batch, scaling)
    recipe = {"images": args.images, "seed": SEED, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "batch": args.batch,
              "unet_lr": "5e-4 AdamW wd 1e-2, 200 warm-up, cosine", "text_encoder": "trained jointly with the UNet, then frozen",
              "objective": "epsilon, scaled_linear betas, 1000 steps", "wall_seconds_this_session": round(time.time() - t0)}
    export(args.out, vae, unet.eval(), text.eval(), scaling, recipe)


if __name__ == "__main__":
    main()
