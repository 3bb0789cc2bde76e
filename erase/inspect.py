"""`erase inspect`: what a checkpoint (or an erase delta / LoRA) holds, as a plain dict."""

from __future__ import annotations

import json
import os
from pathlib import Path

from erase.checkpoint.extras import unknown_tensors
from erase.checkpoint.families import detect_family
from erase.checkpoint.formats import open_checkpoint
from erase.checkpoint.keymap import is_attn2
from erase.checkpoint.model_config import config_source
from erase.checkpoint.transformer_files import TransformerFile, read_transformer_file, refusal, support
from erase.checkpoint.write import sha256_file

EMA_POLICY = (
    "the non-EMA weights (model.diffusion_model.*) are loaded, trained and written, as A1111, ComfyUI and "
    "diffusers use them; the un-erased model_ema.* copy is dropped from erased outputs"
)


def _provenance(metadata: dict[str, str]) -> dict:
    out = {}
    for k, v in metadata.items():
        if k.startswith("erase.") and not k.startswith("erase.model."):
            try:
                out[k[len("erase."):]] = json.loads(v)
            except json.JSONDecodeError:
                out[k[len("erase."):]] = v
    return out


def _transformer_info(tf: TransformerFile) -> dict:
    """An SD3 / SD3.5 or FLUX.1 file or folder: described, with what erase does with it (`supported`: everything a Stable
    Diffusion file gets, which these do not yet)."""
    return {
        "kind": "checkpoint", "family": tf.family, "family_label": tf.label, "layout": tf.layout, "supported": False,
        "refusal": refusal(tf), "support": support(tf), "transformer_parameters": tf.transformer_parameters, "width": tf.width,
        "blocks": tf.blocks, "single_blocks": tf.single_blocks,
        "text_stream_tensors": len(tf.text_stream), "text_stream_parameters": tf.text_stream_parameters,
        "text_kv_parameters": tf.text_kv_parameters, "text_encoders": list(tf.text_encoders), "vae": tf.has_vae,
    }


def describe(path: str | os.PathLike, *, with_hash: bool = False, prediction_type: str | None = None) -> dict:
    path = Path(path)
    folder_size = lambda: sum(p.stat().st_size for p in path.rglob("*") if p.is_file())  # noqa: E731
    ckpt = open_checkpoint(path)  # first: a missing or unreadable path is its one-line error
    size = folder_size() if path.is_dir() else path.stat().st_size
    info: dict = {
        "path": str(path),
        "format": ckpt.format,
        "size_bytes": size,
        "tensor_count": len(ckpt.tensors),
        "dtypes": ckpt.dtypes(),
    }
    kind = ckpt.metadata.get("erase.kind")
    if kind in ("delta", "lora"):
        info["kind"] = kind
        info["parameters"] = sum(t.numel for t in ckpt.tensors.values())
    elif (transformer := read_transformer_file(ckpt)) is not None:
        info.update(_transformer_info(transformer))
    else:
        from erase.models import Model

        family = detect_family(ckpt, prediction_type)
        model = Model(ckpt, family)
        extras = [n for n in ckpt.tensors if n in model.extras]
        unet = [n for n in ckpt.tensors if n.startswith(family.unet_prefix)]
        attn2 = [n for n in unet if is_attn2(n)]
        info.update(
            kind="checkpoint",
            family=family.name,
            family_label=family.label,
            prediction_type=family.prediction_type,
            prediction_source=family.prediction_source,
            default_resolution=model.default_resolution,
            config_source=config_source(ckpt),
            unet_parameters=sum(ckpt.tensors[n].numel for n in unet),
            attn2_tensors=len(attn2),
            attn2_parameters=sum(ckpt.tensors[n].numel for n in attn2),
            ema=family.has_ema,
            extra_tensors=extras,  # position ids, DDPM buffers, EMA scalars...: never loaded, kept byte-identical
            unknown_tensors=unknown_tensors(ckpt, family, model.extras),  # commands other than inspect refuse these
        )
        if family.has_ema:
            info["ema_policy"] = EMA_POLICY
    prov = _provenance(ckpt.metadata)
    if prov:
        info["provenance"] = prov
    if with_hash:
        info["sha256"] = sha256_file(path)
    return info
