"""UNet parameter names: diffusers <-> LDM (CompVis single-file) layout, by formula.

diffusers ships only the LDM -> diffusers direction (`convert_ldm_unet_checkpoint`); the
writer needs the reverse for the parameters we trained. With L = layers_per_block:

  down_blocks.I.resnets.J / .attentions.J   -> input_blocks.{1 + I(L+1) + J}.0 / .1
  down_blocks.I.downsamplers.0.conv         -> input_blocks.{(I+1)(L+1)}.0.op
  mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
  up_blocks.I.resnets.J / .attentions.J     -> output_blocks.{I(L+1) + J}.0 / .1
  up_blocks.I.upsamplers.0.conv             -> output_blocks.{I(L+1) + L}.{2 if attention else 1}.conv

Attention suffixes are unchanged; resnet suffixes are renamed (RESNET_RENAMES). The test suite
checks this formula against diffusers' converter on SD1 (L = 1, 2), SD2 and SDXL layouts.
"""

from __future__ import annotations

import re

from erase.errors import EraseError

RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _layers_per_block(config: dict) -> int:
    lpb = config["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise EraseError("unsupported: UNet with a different layers_per_block per level")
        lpb = lpb[0]
    return int(lpb)


def _resnet_suffix(suffix: str) -> str:
    head, _, rest = suffix.partition(".")
    return f"{RESNET_RENAMES[head]}.{rest}" if head in RESNET_RENAMES else suffix


def diffusers_to_ldm(name: str, config: dict) -> str:
    """LDM name (without the `model.diffusion_model.` prefix) of a diffusers UNet parameter."""
    L = _layers_per_block(config)
    for prefix, ldm in TOP_LEVEL.items():
        if name.startswith(prefix + "."):
            return ldm + name[len(prefix) :]
    if m := _MID.match(name):
        kind, idx, suffix = m.group(1), int(m.group(2)), m.group(3)
        has_attn = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2D"
        if kind == "attentions":
            return f"middle_block.1.{suffix}"
        return f"middle_block.{idx * (2 if has_attn else 1)}.{_resnet_suffix(suffix)}"
    if m := _BLOCK.match(name):
        side, i, kind, j, suffix = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            if kind == "downsamplers":
                return f"input_blocks.{(i + 1) * (L + 1)}.0.op.{suffix.removeprefix('conv.')}"
            index = 1 + i * (L + 1) + j
            return f"input_blocks.{index}.{1 if kind == 'attentions' else 0}.{_sub(kind, suffix)}"
        if kind == "upsamplers":
            has_attn = "CrossAttn" in config["up_block_types"][i]
            return f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.{suffix}"
        index = i * (L + 1) + j
        return f"output_blocks.{index}.{1 if kind == 'attentions' else 0}.{_sub(kind, suffix)}"
    raise EraseError(f"no LDM name for UNet parameter '{name}'")


def _sub(kind: str, suffix: str) -> str:
    return _resnet_suffix(suffix) if kind == "resnets" else suffix


def is_attn2(name: str) -> bool:
    """True for a cross-attention parameter (diffusers or LDM name)."""
    return ".attn2." in name
