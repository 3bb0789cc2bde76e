"""Train the shapes-world FLUX.1-architecture model on the CPU, reusing the shapes SD file's VAE and text tower.

    python examples/shapes/train_flux.py --work /tmp/shapes-work
    python examples/shapes/train_flux.py --work /tmp/shapes-work --distill examples/shapes/shapes-flux-dev.safetensors

Writes two things, as FLUX.1 is published: the transformer alone as one file in Black Forest Labs' layout
(examples/shapes/shapes-flux.safetensors: `double_blocks`, `single_blocks`, fused q/k/v), and beside it a diffusers
FLUX folder without the transformer (examples/shapes/shapes-flux/: the text encoders, tokenizers, VAE and scheduler)
that `--text-encoders` takes, as a real FLUX.1 user passes the release's folder.

The model, and what differs from the released FLUX.1:
  - FluxTransformer2DModel, 128 wide (4 heads of 32), 2 double and 4 single blocks, 2.3 M parameters, on the shapes
    VAE's 8x8x4 latents packed into 16 tokens of 2x2 patches (FLUX.1: 64 x 64 patches of its 16-channel VAE).
  - Text: the shapes SD file's 64-wide CLIP text tower, frozen, in both of FLUX.1's text slots: its 16-token sequence
    where FLUX.1 reads T5's 512 (the `text_encoder_2` slot), its pooled output where FLUX.1 reads CLIP-L's. A short
    fixed length is several times cheaper to train and sample; training and sampling use the same 16 (the folder's
    tokenizer_2 says so: its model_max_length). diffusers' FluxPipeline runs the folder with max_sequence_length=16.
  - No guidance embedder: the model is trained with 10 % empty captions and sampled with classifier-free guidance (two
    forwards), as FLUX.1-dev's undistilled teacher was. So "unconditional" here means the empty prompt, as on SD.
    FLUX.1-dev itself is guidance-distilled (one forward with the scale as an input): `--distill FILE` makes such a
    student of the exported model (its weights plus a guidance embedder, trained on the teacher's guided velocity at
    scales drawn from 1 to 7; the same renders; 2,000 steps), written in the same layout with `guidance_in`.
  - Flow matching as FLUX.1 / SD3 train: x_s = (1 - s) x_0 + s e, the velocity e - x_0 as target, s logit-normal
    (SD3's training density); sampled with the static shift 1 (FLUX.1-schnell's scheduler config).
Stages reuse examples/shapes/train.py's data (the same 40k renders and captions) and resume from --work.
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
from safetensors.torch import save_file
from train import SEED, encode_all, log, resume, save_model, save_stage, stage_data

HERE = Path(__file__).parent
TEXT_LENGTH = 16
FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=[8, 12, 12])
SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
LR = "5e-4 AdamW wd 1e-2, 200 warm-up, cosine; EMA 0.998 exported"
# stage 2: 5000 steps left squares and hearts drawn as circles (base accuracy 0.02 and 0.23 at 48 images each); the
# same loss continues from stage 1's EMA at a lower rate, with a fresh EMA
POLISH_LR = "2e-4 AdamW wd 1e-2, 50 warm-up, cosine; EMA 0.998 exported"
# --distill: a FLUX.1-dev-like student, guidance-distilled from the exported model (its CFG velocity at scales drawn from
# this range, the FluxPipeline dev default 3.5 and the benchmarks' 5 inside it)
GUIDANCE_RANGE = (1.0, 7.0)
DISTILL_LR = "1e-4 AdamW wd 1e-2, 50 warm-up, cosine; EMA 0.998 exported"


def caption_tables(captions: list[str], text) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen tower encodes each distinct caption once: (sequences (U, 16, 64), pooled (U, 64), caption -> row).
    The pooled output is read at FluxPipeline's 77 CLIP tokens; the tower is causal, so it equals the 16-token one."""
    tok, enc = text.tokenizers[0], text.encoders[0]
    unique, which = np.unique(np.array(captions), return_inverse=True)
    seq, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(unique), 256):
            chunk = list(unique[i:i + 256])
            seq.append(enc(tok(chunk, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt").input_ids)[0])
            pooled.append(enc(tok(chunk, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids).pooler_output)
    return torch.cat(seq), torch.cat(pooled), torch.from_numpy(which.reshape(-1))


def forward(model, x: torch.Tensor, sigma: torch.Tensor, seq: torch.Tensor, pooled: torch.Tensor, guidance=None) -> torch.Tensor:
    """The velocity for latents x (B, 4, 8, 8) at noise level sigma (B,), through erase's own FLUX.1 forward; `guidance`
    (one scale per sample) is read only by a model with a guidance embedder (the distilled student)."""
    from erase.backbones.flux import forward as flux_forward
    from erase.models import Conditioning

    return flux_forward(lambda **kw: model(**kw), x, sigma * 1000, Conditioning(seq, pooled), model.config, guidance)


def train(ckpt: Path, model, recipe: dict, latents, tables, *, steps: int, batch: int, scaling: float, seed: int, lr: float = 5e-4,
          warmup: int = 200, teacher=None, empty_row: int | None = None):
    """Flow matching on the renders; with a `teacher`, guidance distillation instead: the target is the teacher's
    classifier-free-guided velocity (against the caption table's row `empty_row`, "") at a scale drawn per sample from
    GUIDANCE_RANGE, given to the model as its input."""
    from erase.engine.trainer import EMA

    seq_table, pooled_table, which = tables
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = EMA(dict(model.named_parameters()), 0.998)
    g = torch.Generator().manual_seed(seed)
    start = resume(ckpt, recipe, g, model=model.load_state_dict, ema=ema.load, opt=opt.load_state_dict, sched=sched.load_state_dict)
    mean, std = latents
    t0 = time.time()
    for step in range(start, steps):
        idx = torch.randint(len(which), (batch,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal (0, 1)
        xs = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        rows = which[idx]
        if teacher is None:
            loss = F.mse_loss(forward(model, xs, sigma, seq_table[rows], pooled_table[rows]), noise - x0)
        else:
            scale = GUIDANCE_RANGE[0] + (GUIDANCE_RANGE[1] - GUIDANCE_RANGE[0]) * torch.rand(batch, generator=g)
            with torch.no_grad():  # the data's empty captions (10 %) teach that "" at any scale is the unconditional velocity
                empty = torch.full_like(rows, empty_row)
                v_u, v_c = forward(teacher, torch.cat([xs, xs]), torch.cat([sigma, sigma]), seq_table[torch.cat([empty, rows])],
                                   pooled_table[torch.cat([empty, rows])]).chunk(2)
            target = v_u + scale.view(-1, 1, 1, 1) * (v_c - v_u)
            loss = F.mse_loss(forward(model, xs, sigma, seq_table[rows], pooled_table[rows], scale), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update()
        if step % 100 == 0:
            log(f"flux step {step}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step - start + 1):.2f}s/step)")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            save_stage(ckpt, recipe, step + 1, g, model=model.state_dict(), ema=ema.shadow, opt=opt.state_dict(), sched=sched.state_dict())
    model.load_state_dict(ema.shadow)  # the EMA is the result
    return model.eval().requires_grad_(False)


@torch.no_grad()
def check(model, vae, text, scaling: float, seeds: int = 4, guidance: float = 5.0, steps: int = 20) -> dict:
    """Shape and colour accuracy of "a {colour} {shape}" at CFG `guidance` (a distilled model: one forward at that
    scale; flow-matching Euler, shift 1), read by the shapes detector: the quick look the export records;
    benchmarks/shapes.py measures the model properly."""
    from erase.shapes import COLOURS, SHAPES, ShapesDetector

    pairs = [(s, c) for s in SHAPES for c in COLOURS for _ in range(seeds)]
    prompts = [f"a {c} {s}" for s, c in pairs]
    seq, pooled, which = caption_tables(prompts + [""], text)
    rows = which[: len(prompts)]
    empty = which[-1].expand(len(prompts))
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(SEED + 7))
    sigmas = torch.linspace(1, 0, steps + 1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        if model.config.guidance_embeds:  # distilled: one forward with the scale as an input
            x = x + (s_next - s) * forward(model, x, s.expand(len(prompts)), seq[rows], pooled[rows], guidance)
            continue
        v = forward(model, torch.cat([x, x]), s.expand(2 * len(prompts)), torch.cat([seq[empty], seq[rows]]),
                    torch.cat([pooled[empty], pooled[rows]]))
        v_u, v_c = v.chunk(2)
        x = x + (s_next - s) * (v_u + guidance * (v_c - v_u))
    images = ((vae.decode(x / scaling).sample + 1) / 2).clamp(0, 1)
    found = ShapesDetector().classify(images)
    return {"shape_accuracy": round(float(np.mean([f[0] == s for f, (s, _) in zip(found, pairs)])), 3),
            "colour_accuracy": round(float(np.mean([f[1] == c for f, (_, c) in zip(found, pairs)])), 3),
            "images": len(prompts), "guidance": guidance, "euler_steps": steps}


def export_folder(folder: Path, text, vae, scaling: float) -> None:
    """A diffusers FLUX folder without the transformer: what --text-encoders takes and FluxPipeline loads."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok, enc = text.tokenizers[0], text.encoders[0]
    for name, length in (("tokenizer", 77), ("tokenizer_2", TEXT_LENGTH)):
        saved = CLIPTokenizer.from_pretrained(tok.name_or_path, model_max_length=length) if Path(tok.name_or_path).is_dir() else tok
        saved.model_max_length = length
        saved.save_pretrained(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        enc.half().save_pretrained(folder / name)
        enc.float()
    vae_cfg = {k: v for k, v in vae.config.items() if not k.startswith("_")} | {"scaling_factor": scaling, "shift_factor": 0.0}
    AutoencoderKL.from_config(vae_cfg).save_pretrained(folder / "vae")  # config, then this VAE's own weights over it
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": __import__("diffusers").__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "transformer": [None, None], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    log(f"wrote {folder}")


def export_file(out: Path, model, recipe: dict, title: str = "erase shapes-world FLUX.1 architecture (tiny)") -> None:
    """The transformer in Black Forest Labs' layout (erase.checkpoint.transformer_keymap's release names), fp16."""
    from erase.checkpoint.transformer_keymap import release_state

    width = model.config.num_attention_heads * model.config.attention_head_dim
    state = {k: v.half().contiguous() for k, v in release_state("flux", model.state_dict(), width).items()}
    meta = {"erase.model.transformer": json.dumps({"attention_head_dim": FLUX["attention_head_dim"], "axes_dims_rope": FLUX["axes_dims_rope"]}),
            "modelspec.title": title, "shapes.training": json.dumps(recipe)}
    save_model(out, state, meta)


def student_of(teacher):
    """The teacher's weights in the same transformer with a guidance embedder (FLUX.1-dev's `guidance_in`) whose output
    layer starts at zero, so that the student starts as the teacher's conditional velocity at every scale."""
    from diffusers import FluxTransformer2DModel

    student = FluxTransformer2DModel(**(FLUX | {"guidance_embeds": True}))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("guidance_embedder" not in k for k in missing):
        raise SystemExit(f"the teacher does not fit the student: missing {missing}, unexpected {unexpected}")
    out = student.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(out.weight)
    torch.nn.init.zeros_(out.bias)
    return student


def distill_main(args, latents, tables, captions: list[str], vae, text, scaling: float) -> None:
    """--distill: the exported model (--out) as the teacher, the student written to --distill."""
    from erase.transformer_model import open_any_model

    if not (args.folder / "model_index.json").is_file():  # the teacher's text encoders, VAE and scheduler
        export_folder(args.folder, text, vae, scaling)
    teacher = open_any_model(args.out, text_encoders=args.folder).load_unet().eval().requires_grad_(False)
    recipe = {"steps": args.distill_steps, "batch": args.batch, "lr": DISTILL_LR, "guidance_range": GUIDANCE_RANGE,
              "objective": "guidance distillation: the teacher's CFG velocity v_u + g (v_c - v_u), g given as input",
              "teacher": args.out.name, "config": FLUX | {"guidance_embeds": True}, "text_length": TEXT_LENGTH}
    student = train(args.work / "flux_distill.pt", student_of(teacher), recipe, latents, tables, steps=args.distill_steps,
                    batch=args.batch, scaling=scaling, seed=SEED + 8, lr=1e-4, warmup=50, teacher=teacher,
                    empty_row=int(tables[2][captions.index("")]))
    metrics = {g: check(student, vae, text, scaling, guidance=g) for g in (3.5, 5.0)}
    log(f"check: {metrics}")
    export_file(args.distill, student, recipe | {"images": args.images, "check": {str(g): m for g, m in metrics.items()}},
                title="erase shapes-world FLUX.1 architecture, guidance-distilled (tiny)")


def main() -> None:
    from diffusers import FluxTransformer2DModel

    from erase.models import open_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/shapes-work"))
    ap.add_argument("--sd", type=Path, default=HERE / "shapes-sd.safetensors", help="the shapes SD file: its VAE and text tower")
    ap.add_argument("--out", type=Path, default=HERE / "shapes-flux.safetensors")
    ap.add_argument("--folder", type=Path, default=HERE / "shapes-flux")
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--polish-steps", type=int, default=4000, help="stage 2, from stage 1's EMA at a lower rate; 0 exports stage 1")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folder-only", action="store_true", help="only write --folder from --sd (seconds; the benchmarks call it)")
    ap.add_argument("--distill", type=Path, help="instead of training: guidance-distil --out into a FLUX.1-dev-like student "
                    "(a guidance embedder, one forward per step) written here")
    ap.add_argument("--distill-steps", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    sd = open_model(args.sd)
    vae, text = sd.load_vae(), sd.load_text_encoder()
    scaling = float(vae.config.scaling_factor)
    if args.folder_only:
        export_folder(args.folder, text, vae, scaling)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data = stage_data(args.work, args.images)
    latents = encode_all(vae, data["images"])
    tables = caption_tables(data["captions"], text)
    if args.distill:
        distill_main(args, latents, tables, data["captions"], vae, text, scaling)
        return
    recipe = {"steps": args.steps, "batch": args.batch, "lr": LR, "config": FLUX, "text_length": TEXT_LENGTH,
              "sigma": "logit-normal (0, 1)", "objective": "flow matching, velocity e - x0"}
    torch.manual_seed(SEED)
    model = train(args.work / "flux_state.pt", FluxTransformer2DModel(**FLUX), recipe, latents, tables, steps=args.steps,
                  batch=args.batch, scaling=scaling, seed=SEED + 5)
    if args.polish_steps:
        log(f"stage 1 check: {check(model, vae, text, scaling)}")
        polish = {"steps": args.polish_steps, "batch": args.batch, "lr": POLISH_LR, "from": f"stage 1's EMA after {args.steps} steps"}
        model = train(args.work / "flux_polish.pt", model.train().requires_grad_(True), polish, latents, tables, steps=args.polish_steps,
                      batch=args.batch, scaling=scaling, seed=SEED + 6, lr=2e-4, warmup=50)
        recipe = recipe | {"polish": polish}
    metrics = check(model, vae, text, scaling)
    log(f"check: {metrics}")
    export_folder(args.folder, text, vae, scaling)
    export_file(args.out, model, recipe | {"images": args.images, "from": args.sd.name, "check": metrics,
                                           "wall_seconds_this_session": round(time.time() - t0)})


if __name__ == "__main__":
    main()
