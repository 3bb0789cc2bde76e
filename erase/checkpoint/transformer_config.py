"""The diffusers configuration of an SD3 / SD3.5 or FLUX.1 single file, and the transformer it loads into.

A release file carries no configuration: everything but the attention heads and FLUX.1's rotary axes is a tensor's
shape. The heads come from the q/k norm's width (SD3.5, FLUX.1: one norm per head); SD3 without q/k norms has heads of
64, as every release. FLUX.1's rotary axes are (16, 56, 56) for its heads of 128, as every release; a file of another
head width (erase's own tiny models) says its axes in `erase.model.transformer` metadata, as any key given there wins.
"""

from __future__ import annotations

import math

import torch

from erase.checkpoint.formats import Checkpoint
from erase.checkpoint.model_config import metadata_config
from erase.checkpoint.transformer_files import TRANSFORMER_CLASSES, TransformerFile
from erase.checkpoint.transformer_keymap import Piece, assemble, transformer_pieces
from erase.errors import EraseError

SD3_HEAD_DIM = 64  # every SD3 / SD3.5 release
FLUX_HEAD_DIM, FLUX_ROPE = 128, (16, 56, 56)  # every FLUX.1 release


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The rotary axes (text position, image row, image column) of a FLUX.1 head: the release's for heads of 128; for
    another width, the same three axes in even sizes that fill the head (erase's tiny models)."""
    if head_dim == FLUX_HEAD_DIM:
        return FLUX_ROPE
    side = 2 * (3 * head_dim // 16)
    return head_dim - 2 * side, side, side


def transformer_config(ckpt: Checkpoint, tf: TransformerFile) -> dict:
    """diffusers' `SD3Transformer2DModel` / `FluxTransformer2DModel` arguments for the transformer `tf` of `ckpt`: a
    folder's own config, or read from a single file's shapes."""
    if tf.folder:
        return {k: v for k, v in ckpt.component_configs["transformer"].items() if not k.startswith("_")}
    def shape(name: str) -> tuple[int, ...]:
        return tuple(ckpt.shape(tf.prefix + name))

    given = metadata_config(ckpt, "transformer")
    names = {n[len(tf.prefix):] for n in tf.transformer}
    if tf.family == "sd3":
        width, in_channels, patch, _ = shape("x_embedder.proj.weight")
        head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0] if "joint_blocks.0.x_block.attn.ln_q.weight" in names else SD3_HEAD_DIM
        pos_max = math.isqrt(shape("pos_embed")[1])
        cfg = {"sample_size": min(128, pos_max), "patch_size": patch, "in_channels": in_channels, "num_layers": tf.blocks,
               "attention_head_dim": head_dim, "num_attention_heads": width // head_dim,
               "joint_attention_dim": shape("context_embedder.weight")[1], "caption_projection_dim": width,
               "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
               "out_channels": shape("final_layer.linear.weight")[0] // (patch * patch), "pos_embed_max_size": pos_max,
               "dual_attention_layers": tuple(i for i in range(tf.blocks) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in names),
               "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in names else None}
    else:
        width, in_channels = shape("img_in.weight")
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        out_channels = shape("final_layer.linear.weight")[0]
        cfg = {"patch_size": 1, "in_channels": in_channels, "out_channels": None if out_channels == in_channels else out_channels,
               "num_layers": tf.blocks, "num_single_layers": tf.single_blocks, "attention_head_dim": head_dim,
               "num_attention_heads": width // head_dim, "joint_attention_dim": shape("txt_in.weight")[1],
               "pooled_projection_dim": shape("vector_in.in_layer.weight")[1], "guidance_embeds": "guidance_in.in_layer.weight" in names,
               "axes_dims_rope": flux_rope_axes(head_dim)}
    cfg.update(given)
    if cfg["num_attention_heads"] * cfg["attention_head_dim"] != width:
        raise EraseError(f"{ckpt.path}: {cfg['num_attention_heads']} heads of {cfg['attention_head_dim']} do not make the width {width}: "
                         "set attention_head_dim in the file's erase.model.transformer metadata")
    return cfg


def file_pieces(ckpt: Checkpoint, tf: TransformerFile) -> list[Piece]:
    """The key map of `tf`'s tensors in `ckpt` (erase.checkpoint.transformer_keymap), from their shapes alone; a folder's
    tensors are its parameters, whole."""
    if tf.folder:
        return [Piece(n, None, n[len(tf.prefix):]) for n in tf.transformer]
    return transformer_pieces(tf.family, {n: tuple(ckpt.shape(n)) for n in tf.transformer}, tf.prefix, tf.width)


def transformer_class(family: str):
    """diffusers' class for an SD3 / FLUX.1 transformer (erase.checkpoint.transformer_files.TRANSFORMER_CLASSES)."""
    import diffusers

    return getattr(diffusers, next(cls for cls, f in TRANSFORMER_CLASSES.items() if f == family))


def meta_transformer(ckpt: Checkpoint, tf: TransformerFile):
    """The transformer of `tf` on the meta device: parameter names and shapes, nothing read or initialised."""
    with torch.device("meta"):
        return transformer_class(tf.family)(**transformer_config(ckpt, tf))


def load_transformer(ckpt: Checkpoint, tf: TransformerFile, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     fp32=None):
    """diffusers' transformer for `tf`, its weights assembled from the file's (fused) tensors, and the key map's pieces
    (erase.checkpoint.transformer_keymap) that write trained parameters back. Built on the meta device and filled by
    assignment: no full-size random initialisation first (FLUX.1 would spend 48 GB on one). `fp32(name)`: parameters
    kept in fp32 from the file's own values whatever `dtype` (a trained subset's masters)."""
    pieces = file_pieces(ckpt, tf)
    state = assemble(pieces, ckpt.get_many)
    model = meta_transformer(ckpt, tf)
    # each file tensor is dropped as soon as it is cast: holding the file's copy until every tensor was cast put the whole
    # file on top of the model (SD3.5 medium in fp32: about 3 GiB more at peak; benchmarks/transformer_run.py)
    cast = {n: state.pop(n).to(device=device, dtype=torch.float32 if fp32 and fp32(n) else dtype) for n in list(state)}
    model.load_state_dict(cast, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise EraseError(f"{ckpt.path}: the transformer has no weights for {', '.join(left[:3])}")
    return model.eval(), pieces
