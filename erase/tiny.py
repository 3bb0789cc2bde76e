"""Tiny, randomly initialised SD1 / SD2 / SDXL checkpoints in the real single-file layout.

For tests, benchmarks and `make demo`, where no real weights can be downloaded. The
components are ordinary diffusers/transformers models (the pattern of diffusers'
`get_dummy_components`), exported with `checkpoint.export` to LDM names.

    python -m erase.tiny sd1 tiny.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from erase.checkpoint.export import clip_to_ldm, unet_to_ldm, vae_to_ldm

FAMILIES = ("sd1", "sd2", "sdxl")


def tiny_configs(family: str, layers_per_block: int = 2) -> dict[str, dict]:
    """Configs whose every value can be read back from the tensor shapes (no metadata needed)."""
    hidden = 32
    unet = dict(
        block_out_channels=[32, 64],
        layers_per_block=layers_per_block,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        norm_num_groups=32,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=hidden,
        attention_head_dim=8,
    )
    te = dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=8, vocab_size=49408,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=hidden)
    cfgs = {"unet": unet, "text_encoder": te}
    if family == "sd2":
        unet.update(use_linear_projection=True, attention_head_dim=[8, 1])
        te.update(hidden_act="gelu", num_hidden_layers=3)  # one more than used: SD2 takes the penultimate layer
    if family == "sdxl":
        unet.update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2],
            use_linear_projection=True,
            attention_head_dim=[8, 1],
            cross_attention_dim=2 * hidden,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=hidden + 6 * 8,
        )
        cfgs["text_encoder_2"] = dict(te, hidden_act="gelu")
    cfgs["vae"] = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                       down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16)
    return cfgs


def tiny_components(family: str, layers_per_block: int = 2, seed: int = 0) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfgs = tiny_configs(family, layers_per_block)
    torch.manual_seed(seed)
    comps = {"unet": UNet2DConditionModel(**cfgs["unet"]), "vae": AutoencoderKL(**cfgs["vae"]),
             "text_encoder": CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))}
    if family == "sdxl":
        comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"]))
    return comps


def ldm_state_dict(family: str, comps: dict) -> dict[str, torch.Tensor]:
    state = unet_to_ldm(comps["unet"].state_dict(), dict(comps["unet"].config))
    state.update(vae_to_ldm(comps["vae"].state_dict(), dict(comps["vae"].config)))
    for name in ("text_encoder", "text_encoder_2"):
        if name in comps:
            te = {k: v for k, v in comps[name].state_dict().items() if not k.endswith("position_ids")}
            state.update(clip_to_ldm(te, family, name))
    return state


def write_tiny_checkpoint(
    path: str | Path,
    family: str = "sd1",
    *,
    layers_per_block: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    with_ema: bool = False,
    metadata: dict[str, str] | None = None,
    configs_in_metadata: bool = False,
) -> Path:
    """Write a tiny single-file checkpoint and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    comps = tiny_components(family, layers_per_block, seed)
    state = {k: v.detach().to(dtype).contiguous() for k, v in ldm_state_dict(family, comps).items()}
    if with_ema:  # LDM stores the EMA copy with the dots removed from the name
        for k in list(state):
            if k.startswith("model.diffusion_model."):
                state["model_ema." + k[len("model."):].replace(".", "")] = state[k].clone()
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    meta = dict(metadata or {})
    if configs_in_metadata:
        for name, comp in comps.items():
            cfg = comp.config.to_dict() if hasattr(comp.config, "to_dict") else dict(comp.config)
            meta[f"erase.model.{name}"] = json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, default=str)
    path = Path(path)
    save_file(state, str(path), metadata=meta or None)
    return path


if __name__ == "__main__":
    write_tiny_checkpoint(sys.argv[2], sys.argv[1])
    print(sys.argv[2])
