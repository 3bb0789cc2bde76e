"""What a checkpoint may carry besides the weights the model needs: a short list, by name.

The official single-file releases carry, beside the UNet, VAE and text-encoder weights:
  - `*.embeddings.position_ids`  int64 [1, 77] in the HF-layout CLIP towers (SD 1.x
                                 `cond_stage_model.transformer.text_model.`, SDXL `conditioner.embedders.0.
                                 transformer.text_model.`; also diffusers folders saved by transformers 4):
                                 a constant arange that transformers 5 no longer keeps in the state dict;
  - the DDPM schedule buffers that CompVis' `DDPM.register_schedule` stores at the top level (DDPM_BUFFERS),
    `logvar` (files saved with a learned log-variance) and SDXL's `denoiser.sigmas` (generative-models'
    DiscreteDenoiser buffer);
  - `model_ema.decay` and `model_ema.num_updates`, LitEma's two scalars, present even in "emaonly" files;
  - OpenCLIP's `logit_scale` (the contrastive temperature) and, where the diffusers text model has no
    projection (SD 2.x's `CLIPTextModel`), its `text_projection`;
  - SD 2.x's last OpenCLIP block, which the penultimate-layer text encoder never runs.
No loader reads these; the writer copies them byte-identically (it never replaces them). `model_ema.*` weights
(the un-erased EMA copy) are a separate case: see `ema_weight_names`. A tensor that no component claims and
this list does not name is refused (`unknown_tensors`) rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from erase.checkpoint.families import LDM_UNET, Family
from erase.checkpoint.formats import Checkpoint
from erase.checkpoint.model_config import TEXT_ENCODER_PREFIXES, VAE_PREFIX, text_encoder_names

DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "denoiser.sigmas",
)
EMA_PREFIX = "model_ema."
EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")
TEXT_EXTRA_SUFFIXES = ("embeddings.position_ids", "logit_scale")


@dataclass(frozen=True)
class Extras:
    """The extras rule for one checkpoint: `name in extras` says whether a tensor is on the list."""

    text_prefixes: tuple[str, ...]  # where each text tower's names start
    no_projection: tuple[str, ...] = ()  # towers whose diffusers model has no text projection
    unused_blocks: tuple[str, ...] = ()  # name prefixes of text blocks the encoder never runs

    @classmethod
    def of(cls, ckpt: Checkpoint, family: Family) -> "Extras":
        if ckpt.format == "diffusers":
            return cls(tuple(f"{c}/" for c in text_encoder_names(family)))
        prefixes, no_projection, unused = [], [], []
        for comp in text_encoder_names(family):
            prefix, layout = TEXT_ENCODER_PREFIXES[(family.name, comp)]
            prefixes.append(prefix)
            if family.name == "sd2":  # CLIPTextModel (no projection) on the penultimate layer
                no_projection.append(prefix)
                blocks = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
                last = max((int(m.group(1)) for k in ckpt.tensors if (m := blocks.match(k))), default=None)
                if last is not None:
                    unused.append(f"{prefix}transformer.resblocks.{last}.")
        return cls(tuple(prefixes), tuple(no_projection), tuple(unused))

    def __contains__(self, name: str) -> bool:
        if name in DDPM_BUFFERS or name in EMA_SCALARS:
            return True
        if self.unused_blocks and name.startswith(self.unused_blocks):
            return True
        for prefix in self.text_prefixes:
            if name.startswith(prefix):
                rest = name[len(prefix):]
                return rest.endswith(TEXT_EXTRA_SUFFIXES) or (prefix in self.no_projection and rest == "text_projection")
        return False


def ema_weight_names(ckpt: Checkpoint) -> list[str]:
    """The `model_ema.*` weights: an un-erased copy of the UNet that erased outputs must not carry.
    LitEma's scalars (`model_ema.decay`, `model_ema.num_updates`) are not weights and are kept."""
    return [k for k in ckpt.tensors if k.startswith(EMA_PREFIX) and k not in EMA_SCALARS]


def ema_drop(ckpt: Checkpoint) -> tuple[set[str], dict[str, str]]:
    """What an erased output leaves out (the EMA weights) and the metadata line that says so."""
    drop = set(ema_weight_names(ckpt))
    if not drop:
        return drop, {}
    return drop, {"erase.dropped": f"{len(drop)} model_ema.* weight tensors (the un-erased EMA copy of the UNet); "
                                   "model_ema.decay and model_ema.num_updates are kept"}


def unknown_tensors(ckpt: Checkpoint, family: Family, extras: Extras) -> list[str]:
    """Tensors that no component (UNet, VAE, text encoders, EMA weights) claims and the extras list does not name."""
    if ckpt.format == "diffusers":  # every tensor belongs to a component; the component loaders check them
        return []
    claimed = (LDM_UNET, VAE_PREFIX, EMA_PREFIX, *extras.text_prefixes)
    return [k for k in ckpt.tensors if not k.startswith(claimed) and k not in extras]
