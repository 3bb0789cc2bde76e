"""SD3 / SD3.5 (diffusers' SD3Transformer2DModel): the latent goes in as it is (the model patches it), the timestep on
the 0..1000 scale of its flow-matching scheduler, the pooled CLIP-L + CLIP-G vector beside the token sequence."""

from __future__ import annotations

import torch


def forward(call, z: torch.Tensor, t: torch.Tensor, cond, config, guidance=None) -> torch.Tensor:
    """The velocity for latents `z` (B, C, H, W) at timestep(s) `t`; `call(**inputs)` runs the model (with the weights
    the caller names). SD3 takes no guidance input (`guidance` is for the families that do)."""
    if cond.pooled is None:
        raise ValueError("SD3 needs the pooled text vector (Conditioning.pooled)")
    b = z.shape[0]
    return call(hidden_states=z, timestep=torch.as_tensor(t, device=z.device).expand(b), encoder_hidden_states=cond.embeds,
                pooled_projections=cond.pooled).sample
