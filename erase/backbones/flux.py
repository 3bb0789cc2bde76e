"""FLUX.1 (diffusers' FluxTransformer2DModel): latents packed into a sequence of 2x2 patches with (0, row, column)
position ids, text positions all zero, the timestep as the sampler's sigma (the model scales it by 1000 itself), and,
for the guidance-distilled dev model, the guidance scale as an input instead of a second forward."""

from __future__ import annotations

import torch

DEV_GUIDANCE = 3.5  # FluxPipeline's default guidance scale for FLUX.1-dev


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, as diffusers' FluxPipeline packs."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for a latent of height `h` and width `w`."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """(rows * cols, 3): (0, row, column) of each packed token."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], -1).reshape(-1, 3).to(device, dtype)


def _guidance(guidance, b: int, device) -> torch.Tensor:
    g = DEV_GUIDANCE if guidance is None else guidance
    return torch.as_tensor(g, dtype=torch.float32, device=device).reshape(-1).expand(b)


def mu(image_tokens: int, cfg) -> float:
    """The sampler's shift for an image of `image_tokens` packed tokens, as FluxPipeline computes it from the scheduler's
    config (linear between the base and the max sequence lengths)."""
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return image_tokens * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]


def set_timesteps(scheduler, steps: int, latent_rows: int) -> None:
    """The sampler's timesteps as FluxPipeline sets them: sigmas evenly from 1 to 1/steps, shifted by the image's packed
    token count where the scheduler shifts by resolution (dev)."""
    import numpy as np

    shift = mu((latent_rows // 2) ** 2, scheduler.config) if scheduler.config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift)


def forward(call, z: torch.Tensor, t: torch.Tensor, cond, config, guidance: torch.Tensor | float | None = None) -> torch.Tensor:
    """The velocity for latents `z` (B, C, H, W) at timestep(s) `t` on the 0..1000 scale; `call(**inputs)` runs the
    model. `guidance` (a scale, or one per sample; None: FluxPipeline's 3.5) is used only by a guidance-distilled model
    (FLUX.1-dev)."""
    if cond.pooled is None:
        raise ValueError("FLUX.1 needs the pooled CLIP vector (Conditioning.pooled)")
    b, _, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.1 packs 2x2 latent patches: a {h}x{w} latent cannot be packed")
    sigma = torch.as_tensor(t, device=z.device, dtype=z.dtype).expand(b) / 1000
    out = call(hidden_states=pack(z), timestep=sigma, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
               img_ids=image_ids(h // 2, w // 2, z.device, z.dtype),
               txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=z.device, dtype=z.dtype),
               guidance=_guidance(guidance, b, z.device) if config.guidance_embeds else None).sample
    return unpack(out, h, w)
