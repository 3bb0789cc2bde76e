"""diffusers/transformers configs for one checkpoint's components.

Order of precedence (later wins):
  1. the family's carried config (`configs/<family>/...`, the official releases' values),
  2. what the tensor shapes say (channels, levels, layers, widths: any size loads),
  3. configs stored in the file's `__metadata__` under `erase.model.<component>` (JSON):
     the project's own small models carry them, since head counts and group-norm groups
     cannot be read from weights.
A diffusers folder brings its own configs and skips 1-3.
"""

from __future__ import annotations

import json
import re
from math import gcd
from pathlib import Path

from erase.checkpoint.families import LDM_UNET, Family
from erase.checkpoint.formats import Checkpoint
from erase.errors import EraseError

CONFIG_ROOT = Path(__file__).parent / "configs"
METADATA_KEY = "erase.model.{}"  # erase.model.unet, .vae, .text_encoder, .text_encoder_2, .scheduler
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIXES = {  # (family, component) -> (prefix, layout)
    ("sd1", "text_encoder"): ("cond_stage_model.transformer.text_model.", "hf"),
    ("sd2", "text_encoder"): ("cond_stage_model.model.", "openclip"),
    ("sdxl", "text_encoder"): ("conditioner.embedders.0.transformer.text_model.", "hf"),
    ("sdxl", "text_encoder_2"): ("conditioner.embedders.1.model.", "openclip"),
}


def family_config_dir(family: str) -> Path:
    return CONFIG_ROOT / family


def _carried(family: str, component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((CONFIG_ROOT / family / component / name).read_text())


def text_encoder_names(family: Family) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if family.name == "sdxl" else ["text_encoder"]


def indices(keys, prefix: str) -> set[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def metadata_config(ckpt: Checkpoint, component: str) -> dict:
    raw = ckpt.metadata.get(METADATA_KEY.format(component))
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise EraseError(f"{ckpt.path}: metadata {METADATA_KEY.format(component)} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise EraseError(f"{ckpt.path}: metadata {METADATA_KEY.format(component)} must be a JSON object")
    return cfg


def config_source(ckpt: Checkpoint) -> str:
    """One line for reports: where the component configs came from."""
    if ckpt.format == "diffusers":
        return "diffusers folder configs"
    if any(k.startswith("erase.model.") for k in ckpt.metadata):
        return "file metadata (erase.model.*)"
    return "inferred from tensor shapes + family defaults (heads, norm groups assumed)"


def _heads(channels: int, family: str, default) -> int:
    """Attention heads per level. SD1 uses 8 heads; SD2/SDXL use 64-wide heads."""
    if family == "sd1":
        h = default if isinstance(default, int) else 8
        return h if channels % h == 0 else gcd(channels, h)
    return max(1, channels // 64) if channels % 64 == 0 else gcd(channels, 8)


def _groups(channels: list[int], default: int = 32) -> int:
    g = default
    for c in channels:
        g = gcd(g, c)
    return g


def unet_config(ckpt: Checkpoint, family: Family) -> dict:
    if ckpt.format == "diffusers":
        return dict(ckpt.component_configs["unet"])
    cfg = _carried(family.name, "unet")
    keys = list(ckpt.tensors)
    p = LDM_UNET
    shape = ckpt.shape
    model_channels, in_channels = shape(p + "input_blocks.0.0.weight")[:2]
    inputs = indices(keys, p + "input_blocks.")
    n_down = sum(f"{p}input_blocks.{i}.0.op.weight" in ckpt for i in inputs)
    levels = n_down + 1
    if (len(inputs) - 1 - n_down) % levels:
        raise EraseError("unsupported: UNet input blocks do not divide evenly into levels")
    L = (len(inputs) - 1 - n_down) // levels
    channels, down_types, tlayers = [], [], []
    for i in range(levels):
        first = 1 + i * (L + 1)
        channels.append(shape(f"{p}input_blocks.{first}.0.out_layers.3.weight")[0])
        attn = f"{p}input_blocks.{first}.1."
        if any(k.startswith(attn) for k in keys):
            down_types.append("CrossAttnDownBlock2D")
            tlayers.append(len(indices(keys, attn + "transformer_blocks.")))
        else:
            down_types.append("DownBlock2D")
            tlayers.append(1)
    k_names = [k for k in keys if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    if not k_names:
        raise EraseError("unsupported: UNet has no cross-attention (attn2) layers")
    proj_in = next(k for k in keys if k.startswith(p) and k.endswith("proj_in.weight"))
    default_heads = cfg["attention_head_dim"]
    cfg.update(
        in_channels=in_channels,
        out_channels=shape(p + "out.2.weight")[0],
        block_out_channels=channels,
        layers_per_block=L,
        down_block_types=down_types,
        up_block_types=["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(down_types)],
        cross_attention_dim=shape(k_names[0])[1],
        use_linear_projection=len(shape(proj_in)) == 2,
        norm_num_groups=_groups(channels, cfg.get("norm_num_groups", 32)),
    )
    heads = [_heads(c, family.name, default_heads) for c in channels]
    cfg["attention_head_dim"] = heads[0] if family.name == "sd1" and len(set(heads)) == 1 else heads
    if family.name == "sdxl" or any(t != 1 for t in tlayers):
        cfg["transformer_layers_per_block"] = tlayers
    if not any(k.startswith(p + "middle_block.1.") for k in keys):
        cfg["mid_block_type"] = "UNetMidBlock2D"
    if shape(p + "time_embed.0.weight")[0] != 4 * model_channels:
        cfg["time_embedding_dim"] = shape(p + "time_embed.0.weight")[0]
    if family.name == "sdxl":
        # label_emb input = pooled text (text_projection width) + 6 size/crop ids x the time-id embedding width
        total = shape(p + "label_emb.0.0.weight")[1]
        pooled = shape("conditioner.embedders.1.model.text_projection")[1]
        cfg.update(projection_class_embeddings_input_dim=total, addition_time_embed_dim=(total - pooled) // 6)
    if family.name == "sd2" and family.prediction_type == "epsilon":
        cfg["sample_size"] = 64
    cfg.update(metadata_config(ckpt, "unet"))
    return cfg


def vae_config(ckpt: Checkpoint, family: Family, base: dict | None = None) -> dict | None:
    """None when the file carries no VAE (a UNet-only file). `base`: what the shapes do not say (scaling and shift
    factors), instead of the family's carried config."""
    if ckpt.format == "diffusers":
        return dict(ckpt.component_configs["vae"]) if "vae" in ckpt.component_configs else None
    p = VAE_PREFIX
    if p + "encoder.conv_in.weight" not in ckpt:
        return None
    cfg = dict(base) if base is not None else _carried(family.name, "vae")
    keys = list(ckpt.tensors)
    levels = sorted(indices(keys, p + "encoder.down."))
    channels = [ckpt.shape(f"{p}encoder.down.{i}.block.0.conv1.weight")[0] for i in levels]
    cfg.update(
        in_channels=ckpt.shape(p + "encoder.conv_in.weight")[1],
        out_channels=ckpt.shape(p + "decoder.conv_out.weight")[0],
        latent_channels=ckpt.shape(p + "decoder.conv_in.weight")[1],
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        layers_per_block=len(indices(keys, p + "encoder.down.0.block.")),
        norm_num_groups=_groups(channels, cfg.get("norm_num_groups", 32)),
    )
    cfg.update(metadata_config(ckpt, "vae"))
    return cfg


def text_encoder_config(ckpt: Checkpoint, family: Family, component: str = "text_encoder") -> dict:
    if ckpt.format == "diffusers":
        return dict(ckpt.component_configs[component])
    cfg = _carried(family.name, component)
    prefix, layout = TEXT_ENCODER_PREFIXES[(family.name, component)]
    keys = list(ckpt.tensors)
    if not any(k.startswith(prefix) for k in keys):
        raise EraseError(f"{ckpt.path}: no {component} weights under {prefix}*")
    if layout == "hf":
        vocab, hidden = ckpt.shape(prefix + "embeddings.token_embedding.weight")
        layers = len(indices(keys, prefix + "encoder.layers."))
        cfg.update(
            intermediate_size=ckpt.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
            max_position_embeddings=ckpt.shape(prefix + "embeddings.position_embedding.weight")[0],
        )
    else:
        vocab, hidden = ckpt.shape(prefix + "token_embedding.weight")
        layers = len(indices(keys, prefix + "transformer.resblocks."))
        # SD2 uses the penultimate layer: diffusers models that as one layer fewer.
        if family.name == "sd2":
            layers -= 1
        cfg.update(
            intermediate_size=ckpt.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
            max_position_embeddings=ckpt.shape(prefix + "positional_embedding")[0],
        )
        if prefix + "text_projection" in ckpt:
            cfg["projection_dim"] = ckpt.shape(prefix + "text_projection")[1]
    cfg.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64) if hidden % 64 == 0 else gcd(hidden, 8),
    )
    cfg.update(metadata_config(ckpt, component))
    return cfg


def scheduler_config(ckpt: Checkpoint, family: Family) -> dict:
    if ckpt.format == "diffusers" and "scheduler" in ckpt.component_configs:
        cfg = dict(ckpt.component_configs["scheduler"])
    else:
        cfg = _carried(family.name, "scheduler")
        cfg.update(metadata_config(ckpt, "scheduler"))
    cfg["prediction_type"] = family.prediction_type
    return cfg
