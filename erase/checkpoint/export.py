"""diffusers components -> one LDM-layout (single-file) state dict.

diffusers converts LDM -> diffusers only. We need the reverse to save the project's own
models (the shapes world) and test fixtures as ordinary single files that A1111, ComfyUI and
diffusers' `from_single_file` read. Each mapping is checked in the tests by converting back
with diffusers' own converters and comparing every tensor.
"""

from __future__ import annotations

import re

import torch

from erase.checkpoint.families import LDM_UNET
from erase.checkpoint.keymap import diffusers_to_ldm
from erase.checkpoint.model_config import TEXT_ENCODER_PREFIXES, VAE_PREFIX

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    return {LDM_UNET + diffusers_to_ldm(k, config): v for k, v in state.items()}


def _vae_name(name: str, levels: int) -> tuple[str, bool]:
    """(LDM name, is a mid-block attention weight that LDM stores as a 1x1 conv)."""
    name = name.replace("conv_norm_out", "norm_out")
    m = re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        part, side, i, kind, j, rest = m.groups()
        i = int(i) if side == "down" else levels - 1 - int(i)
        ldm_side = "down" if side == "down" else "up"
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            return f"{part}.{ldm_side}.{i}.block.{j}.{_VAE_RESNET.get(head, head)}.{tail}", False
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{part}.{ldm_side}.{i}.{sampler}.{rest}", False
    m = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        part, kind, j, rest = m.groups()
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            return f"{part}.mid.block_{int(j) + 1}.{_VAE_RESNET.get(head, head)}.{tail}", False
        for ours, ldm in _VAE_ATTN.items():
            if rest.startswith(ours + "."):
                return f"{part}.mid.attn_1.{ldm}{rest[len(ours):]}", rest.endswith("weight") and ours != "group_norm"
    return name, False


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    out = {}
    for k, v in state.items():
        name, conv = _vae_name(k, levels)
        out[VAE_PREFIX + name] = v[:, :, None, None] if conv else v
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], family: str, component: str = "text_encoder") -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) state -> the family's LDM text-encoder names."""
    prefix, layout = TEXT_ENCODER_PREFIXES[(family, component)]
    if layout == "hf":
        # transformers < 5 names CLIPTextModel tensors "text_model.*", 5.x drops the prefix
        return {prefix + k.removeprefix("text_model."): v for k, v in state.items() if k != "text_projection.weight"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layer_renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for k, v in state.items():
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
            continue
        k = k.removeprefix("text_model.")
        if k in simple:
            out[prefix + simple[k]] = v
            continue
        m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            continue
        n, mod, kind = m.groups()
        if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault(f"{n}.{kind}", {})[mod[-6]] = v
            continue
        out[f"{prefix}transformer.resblocks.{n}.{layer_renames[mod]}.{kind}"] = v
    for key, parts in qkv.items():
        n, kind = key.split(".")
        out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out

