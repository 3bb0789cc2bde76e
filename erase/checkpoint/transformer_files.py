"""What an SD3 / SD3.5 or FLUX.1 single file or diffusers folder holds, read from its tensor names and shapes (a folder: and
its transformer's config). The single files' layouts:
  SD3 / SD3.5  Stability's: `model.diffusion_model.joint_blocks.N.{x_block,context_block}.*` (q, k and v fused in
               `attn.qkv`), text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.*` where the file carries them,
               the VAE under `first_stage_model.*`. SD3.5 adds q/k RMS norms (`attn.ln_q`); SD3.5 medium also an
               image-only second attention in its first blocks (`x_block.attn2`: not cross-attention).
  FLUX.1       Black Forest Labs': `double_blocks.N.{img,txt}_{attn,mlp,mod}.*` and `single_blocks.N.*` (whose
               `linear1` fuses q, k, v and the MLP's input for the joined sequence), transformer only, with or without
               ComfyUI's `model.diffusion_model.` prefix; dev has a guidance embedder (`guidance_in`), schnell none.
The text stream is what carries the prompt into the image: SD3's `context_embedder` and `context_block`s, FLUX's
`txt_in` and the double blocks' `txt_*`; its keys and values are rows width..3*width of each fused `qkv`.
A diffusers folder names its transformer's tensors as diffusers does (listed as `transformer/<name>`), nothing fused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from erase.checkpoint.formats import Checkpoint

PREFIX = "model.diffusion_model."
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")
OTHER_COMPONENTS = ("text_encoders.", "first_stage_model.", "vae.")  # what an all-in-one file carries beside the transformer


@dataclass(frozen=True)
class TransformerFile:
    family: str  # "sd3" | "flux"
    label: str  # the release it looks like: "SD3.5 large", "FLUX.1-dev", ...
    prefix: str  # "model.diffusion_model." or "" (FLUX.1 as Black Forest Labs publish it)
    width: int  # the transformer's hidden size
    blocks: int  # joint blocks (SD3) or double-stream blocks (FLUX.1)
    single_blocks: int  # FLUX.1's single-stream blocks (SD3: 0)
    transformer: list[str]  # the transformer's tensor names
    text_stream: list[str]  # the tensors that only the text tokens pass through
    text_kv_parameters: int  # the text stream's key and value rows in its fused qkv tensors (weights and biases)
    text_encoders: tuple[str, ...]  # the text encoders the file carries (the rest must come from elsewhere)
    has_vae: bool
    transformer_parameters: int
    text_stream_parameters: int
    folder: bool = False  # a diffusers folder (names are diffusers' under `transformer/`, nothing fused)

    @property
    def layout(self) -> str:
        if self.folder:
            return "a diffusers folder"
        if self.family == "sd3":
            return "Stability's layout"
        return "Black Forest Labs' layout" + (" with ComfyUI's model.diffusion_model. prefix" if self.prefix else "")


def _text_encoders(keys: list[str]) -> tuple[str, ...]:
    return tuple(e for e in TEXT_ENCODERS if any(k.startswith(f"text_encoders.{e}.") for k in keys))


def _has_vae(keys: list[str]) -> bool:
    return any(k.startswith(("first_stage_model.", "vae.")) for k in keys)


def sd3_label(*, dual: bool, qk_norm: bool) -> str:
    """SD3.5 medium has MMDiT-X's second image attention, SD3.5 large q/k norms without it, SD3 medium neither."""
    return "SD3.5 medium" if dual else "SD3.5 large" if qk_norm else "SD3 medium"


def flux_label(*, in_channels: int, guided: bool) -> str:
    """FLUX.1 Fill and Depth take the image's own conditioning in extra input channels (diffusers tells them apart so);
    dev is guidance-distilled (a guidance embedder), schnell is not. Another input width is no release (erase's
    shapes-world model packs a 4-channel VAE's latents: 16)."""
    if in_channels not in (64, 128, 384):
        return f"FLUX.1-architecture model ({'with' if guided else 'no'} guidance embedder)"
    return {384: "FLUX.1 Fill", 128: "FLUX.1 Depth"}.get(in_channels, "FLUX.1-dev" if guided else "FLUX.1-schnell")


def _blocks(names: list[str], kind: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{kind}\.(\d+)\.", n))}
    return max(found) + 1 if found else 0


def _width(ckpt: Checkpoint, name: str, local: list[str], prefix: str) -> int:
    """The hidden size: the patch embedder's outputs, else the inputs of any fused qkv (a partial file), else 0."""
    if prefix + name in ckpt:
        return ckpt.shape(prefix + name)[0]
    qkv = next((prefix + n for n in local if n.endswith("qkv.weight") and len(ckpt.shape(prefix + n)) == 2), None)
    return ckpt.shape(qkv)[1] if qkv else 0


def _kv_parameters(ckpt: Checkpoint, fused: list[str], width: int) -> int:
    """Rows width..3*width of each fused qkv tensor: its keys and values."""
    return sum(2 * width * (ckpt.shape(n)[1] if len(ckpt.shape(n)) == 2 else 1) for n in fused)


def read_transformer_file(ckpt: Checkpoint) -> TransformerFile | None:
    """The SD3 / SD3.5 or FLUX.1 transformer this single file or diffusers folder holds, or None when it holds neither."""
    if ckpt.format == "diffusers":
        return _folder(ckpt) if "transformer" in ckpt.component_configs else None
    keys = list(ckpt.tensors)
    prefix = PREFIX if any(k.startswith((PREFIX + "joint_blocks.", PREFIX + "double_blocks.")) for k in keys) else ""
    local = [k[len(prefix):] for k in keys if k.startswith(prefix) and not k.startswith(OTHER_COMPONENTS)]  # the transformer's
    if any(n.startswith("joint_blocks.") for n in local):
        return _sd3(ckpt, keys, prefix, local)
    if any(n.startswith("double_blocks.") for n in local):
        return _flux(ckpt, keys, prefix, local)
    return None


def _sd3(ckpt: Checkpoint, keys: list[str], prefix: str, local: list[str]) -> TransformerFile:
    width = _width(ckpt, "x_embedder.proj.weight", local, prefix)
    blocks = _blocks(local, "joint_blocks")
    label = sd3_label(dual=any(".x_block.attn2." in n for n in local), qk_norm=any(".attn.ln_q." in n for n in local))
    text = [n for n in local if n.startswith("context_embedder.") or ".context_block." in n]
    fused = [prefix + n for n in text if n.endswith(".attn.qkv.weight") or n.endswith(".attn.qkv.bias")]
    return TransformerFile(
        family="sd3", label=label, prefix=prefix, width=width, blocks=blocks, single_blocks=0,
        transformer=[prefix + n for n in local],
        text_stream=[prefix + n for n in text], text_kv_parameters=_kv_parameters(ckpt, fused, width),
        text_encoders=_text_encoders(keys), has_vae=_has_vae(keys), **_counts(ckpt, prefix, local, text))


def _flux(ckpt: Checkpoint, keys: list[str], prefix: str, local: list[str]) -> TransformerFile:
    width = _width(ckpt, "img_in.weight", local, prefix)
    in_channels = ckpt.shape(prefix + "img_in.weight")[1] if prefix + "img_in.weight" in ckpt else 64
    label = flux_label(in_channels=in_channels, guided=any(n.startswith("guidance_in.") for n in local))
    text = [n for n in local if n.startswith("txt_in.") or re.match(r"double_blocks\.\d+\.txt_", n)]
    fused = [prefix + n for n in text if n.endswith(".txt_attn.qkv.weight") or n.endswith(".txt_attn.qkv.bias")]
    return TransformerFile(
        family="flux", label=label, prefix=prefix, width=width, blocks=_blocks(local, "double_blocks"),
        single_blocks=_blocks(local, "single_blocks"), transformer=[prefix + n for n in local],
        text_stream=[prefix + n for n in text], text_kv_parameters=_kv_parameters(ckpt, fused, width),
        text_encoders=_text_encoders(keys), has_vae=_has_vae(keys),  # ComfyUI's all-in-one FLUX.1 files carry both
        **_counts(ckpt, prefix, local, text))


def _counts(ckpt: Checkpoint, prefix: str, local: list[str], text: list[str]) -> dict[str, int]:
    return {"transformer_parameters": sum(ckpt.tensors[prefix + n].numel for n in local),
            "text_stream_parameters": sum(ckpt.tensors[prefix + n].numel for n in text)}


# The text stream by diffusers' parameter names (what only the prompt's tokens pass through, in the joint / double blocks)
def is_text_kv(name: str) -> bool:
    return ".attn.add_k_proj." in name or ".attn.add_v_proj." in name


def is_text_stream(name: str) -> bool:
    return name.startswith("context_embedder.") or any(
        s in name for s in (".attn.add_", ".attn.to_add_out.", ".ff_context.", ".norm1_context.", ".attn.norm_added_"))


TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
FOLDER_TEXT_ENCODERS = {"sd3": ("clip_l", "clip_g", "t5xxl"), "flux": ("clip_l", "t5xxl")}  # text_encoder, _2, _3 in order
FOLDER_PREFIX = "transformer/"  # a diffusers folder's transformer tensors, as erase.checkpoint.formats lists them


def _folder(ckpt: Checkpoint) -> TransformerFile:
    """The SD3 / SD3.5 or FLUX.1 pipeline of a diffusers folder (erase.checkpoint.formats read its transformer's shards and
    its components' configs): diffusers' names, nothing fused."""
    config = ckpt.component_configs["transformer"]
    family = TRANSFORMER_CLASSES[config["_class_name"]]
    names = [n for n in ckpt.tensors if n.startswith(FOLDER_PREFIX)]
    text = [n for n in names if is_text_stream(n[len(FOLDER_PREFIX):])]
    label = (sd3_label(dual=bool(config.get("dual_attention_layers")), qk_norm=bool(config.get("qk_norm"))) if family == "sd3"
             else flux_label(in_channels=config.get("in_channels", 64), guided=bool(config.get("guidance_embeds"))))
    encoders = [e for e, component in zip(FOLDER_TEXT_ENCODERS[family], ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if component in ckpt.component_configs]
    numel = lambda group: sum(ckpt.tensors[n].numel for n in group)  # noqa: E731
    return TransformerFile(
        family=family, label=label, prefix=FOLDER_PREFIX, width=config["num_attention_heads"] * config["attention_head_dim"],
        blocks=config["num_layers"], single_blocks=config.get("num_single_layers", 0), transformer=names, text_stream=text,
        text_kv_parameters=numel([n for n in names if is_text_kv(n)]), text_encoders=tuple(encoders),
        has_vae="vae" in ckpt.component_configs, transformer_parameters=numel(names), text_stream_parameters=numel(text), folder=True)


def support(tf: TransformerFile) -> str:
    """What erase does with this file or folder, for `erase inspect`."""
    attack = "CCE, UnlearnDiffAtk (its prefix's gradient through the CLIP towers)"
    needs = " with --text-encoders (a diffusers FLUX.1 folder)" if tf.family == "flux" and not tf.folder else ""
    return (f"inspect; generate, evaluate, run (SDD, ESD, UCE, CA), feedback (HFI) and attack ({attack}){needs}; merge and LoRA "
            "export; not FLUX.1-dev's negative prompts or SLD")


def refusal(tf: TransformerFile) -> str:
    """The one line that commands other than these print for these files."""
    return f"unsupported: {tf.label} ({tf.layout}); erase inspect reads it, generate, evaluate, run, attack and merge take it"
