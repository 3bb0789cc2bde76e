"""Detect which Stable Diffusion family a checkpoint belongs to, from tensor names and shapes.

Structure, not sizes, decides (so tiny test models and odd fine-tunes work):
  SD1   text encoder under `cond_stage_model.transformer.*`  (HF CLIP layout)
  SD2   text encoder under `cond_stage_model.model.*`        (OpenCLIP layout)
  SDXL  `conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*` and a UNet `label_emb`
Nothing in the weights says v-prediction: metadata (`modelspec.prediction_type`) or the
`--prediction-type` flag decide; SD2 otherwise defaults to v (the 768-v release), like diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

from erase.checkpoint.formats import Checkpoint
from erase.checkpoint.transformer_files import read_transformer_file, refusal
from erase.errors import EraseError, UsageError

LDM_UNET = "model.diffusion_model."
PREDICTION_TYPES = ("epsilon", "v_prediction")
FAMILY_LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL (base)"}
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # sd2 epsilon (512-base) -> 512


@dataclass(frozen=True)
class Family:
    name: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    prediction_source: str  # where prediction_type came from, for reports
    unet_prefix: str  # "model.diffusion_model." (single file) or "unet/" (diffusers folder)
    has_ema: bool  # single file also carries `model_ema.*` weights

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self.name]

    @property
    def default_resolution(self) -> int:
        if self.name == "sd2" and self.prediction_type == "epsilon":
            return 512
        return DEFAULT_RESOLUTION[self.name]


def _normalise_prediction(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("epsilon", "eps"):
        return "epsilon"
    if v in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    return None


def detect_family(ckpt: Checkpoint, prediction_type: str | None = None) -> Family:
    """Name the family or raise `EraseError("unsupported: ...")` naming what was found."""
    if prediction_type is not None and _normalise_prediction(prediction_type) is None:
        raise UsageError(f"--prediction-type must be epsilon or v_prediction, not '{prediction_type}'")
    if ckpt.format == "diffusers":
        name, prefix, has_ema = _family_of_diffusers(ckpt), "unet/", False
    else:
        name, prefix = _family_of_single_file(ckpt), LDM_UNET
        has_ema = sum(k.startswith("model_ema.") for k in ckpt.tensors) > 10

    if prediction_type is not None:
        pred, source = _normalise_prediction(prediction_type), "--prediction-type"
    elif ckpt.metadata.get("modelspec.prediction_type") and _normalise_prediction(ckpt.metadata["modelspec.prediction_type"]):
        pred, source = _normalise_prediction(ckpt.metadata["modelspec.prediction_type"]), "modelspec metadata"
    elif ckpt.format == "diffusers" and ckpt.component_configs.get("scheduler", {}).get("prediction_type"):
        pred, source = ckpt.component_configs["scheduler"]["prediction_type"], "scheduler config"
    elif name == "sd2":
        pred, source = "v_prediction", "assumed for SD 2.x (768-v); pass --prediction-type epsilon for 512-base models"
    else:
        pred, source = "epsilon", f"standard for {name.upper()}"
    return Family(name=name, prediction_type=pred, prediction_source=source, unet_prefix=prefix, has_ema=has_ema)


def _prefixes(keys) -> str:
    seen: dict[str, int] = {}
    for k in keys:
        p = ".".join(k.split(".")[:2])
        seen[p] = seen.get(p, 0) + 1
    top = sorted(seen.items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{p}.* ({n})" for p, n in top)


def _family_of_single_file(ckpt: Checkpoint) -> str:
    keys = ckpt.tensors.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if any("lora_unet_" in k or ".lora_down." in k or ".lora_A." in k or "lora_te" in k for k in keys):
        raise EraseError("unsupported: this is a LoRA file (lora_* tensors), not a full checkpoint; erase needs the base model")
    if (transformer := read_transformer_file(ckpt)) is not None:
        raise EraseError(refusal(transformer))
    if has("control_model."):
        raise EraseError("unsupported: a ControlNet checkpoint (control_model.*)")
    conv_in = LDM_UNET + "input_blocks.0.0.weight"
    if conv_in not in ckpt:
        if has("first_stage_model.") or has("encoder.down."):
            raise EraseError("unsupported: a VAE-only file (no UNet under model.diffusion_model.*)")
        raise EraseError(f"unsupported: no Stable Diffusion UNet (model.diffusion_model.*) found; tensors: {_prefixes(keys)}")
    in_ch = ckpt.shape(conv_in)[1]
    if in_ch != 4:
        kind = "an inpainting" if in_ch == 9 else "an instruct-pix2pix / depth" if in_ch in (5, 8) else "a non-standard"
        raise EraseError(f"unsupported: {kind} UNet (conv_in takes {in_ch} channels, not 4)")
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        if LDM_UNET + "label_emb.0.0.weight" not in ckpt:
            raise EraseError("unsupported: SDXL-style text encoders but no UNet label_emb (size/crop conditioning)")
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise EraseError("unsupported: SDXL refiner (single OpenCLIP bigG text encoder); erase supports SDXL base")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise EraseError(f"unsupported: UNet without a recognised text encoder; tensors: {_prefixes(keys)}")


def _family_of_diffusers(ckpt: Checkpoint) -> str:
    unet = ckpt.component_configs.get("unet", {})
    if unet.get("in_channels", 4) != 4:
        raise EraseError(f"unsupported: a UNet with {unet.get('in_channels')} input channels (inpainting or similar)")
    if unet.get("addition_embed_type") == "text_time":
        if "text_encoder" not in ckpt.component_configs:
            raise EraseError("unsupported: SDXL refiner (no first text encoder); erase supports SDXL base")
        return "sdxl"
    te = ckpt.component_configs.get("text_encoder", {})
    if te.get("hidden_act") == "gelu" or unet.get("use_linear_projection"):
        return "sd2"
    return "sd1"
