"""Which UNet parameters train. The choice is explicit, named, and printed before step 0."""

from __future__ import annotations

import torch

from erase.backbones import rules
from erase.checkpoint.transformer_files import TRANSFORMER_CLASSES
from erase.errors import UsageError

TRAIN_SETS = {
    "xattn": "every cross-attention parameter (attn2: to_q, to_k, to_v, to_out.0), the SDD reference; SD3 / FLUX.1: the text "
             "stream's attention (add_q_proj, add_k_proj, add_v_proj, to_add_out)",
    "xattn-kv": "cross-attention keys and values only (attn2.to_k, attn2.to_v): the text-facing projections; SD3 / FLUX.1: the "
                "text stream's (add_k_proj, add_v_proj)",
    "text-kv": "SD3 / FLUX.1 only: the text stream's keys and values and the pooled text vector's embedder (its first layer, "
               "which feeds every block's modulation): every way the prompt reaches the image",
    "attn": "every attention projection, self- and cross- (attn1, attn2: to_q, to_k, to_v, to_out.0); Concept Ablation's for nudity",
    "noxattn": "every UNet parameter except cross-attention (ESD-u, the ESD authors' choice for nudity and objects)",
    "full": "every UNet parameter (largest change, most memory)",
}
def selects(name: str, which: str, transformer: bool = False) -> bool:
    """Whether the trainable set `which` holds parameter `name` (diffusers name) of a UNet, or of an SD3 / FLUX.1
    transformer (`transformer`): each family's rules are its backbone's (erase.backbones)."""
    if which == "full":
        return True
    return rules(transformer).selects(name, which)


def closed_form_edits(name: str, transformer: bool = False) -> bool:
    """Whether a closed-form edit (UCE) changes parameter `name` of a UNet or an SD3 / FLUX.1 transformer: the weights
    that map the text encoder's tokens (erase.backbones)."""
    return name.endswith(rules(transformer).CLOSED_FORM)


def is_transformer(model: torch.nn.Module) -> bool:
    """An SD3 / FLUX.1 transformer rather than a UNet."""
    return type(model).__name__ in TRANSFORMER_CLASSES


def select_trainable(unet: torch.nn.Module, which: str) -> dict[str, torch.nn.Parameter]:
    """Mark the chosen parameters trainable (all others frozen); return them by diffusers name."""
    if which not in TRAIN_SETS:
        raise UsageError(f"--train must be one of {', '.join(TRAIN_SETS)}, not '{which}'")
    chosen, transformer = {}, is_transformer(unet)
    for name, p in unet.named_parameters():
        keep = selects(name, which, transformer)
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    if not chosen:
        raise UsageError(f"--train {which} selects no parameters in this UNet")
    return chosen


def trained_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters `select_trainable` left trainable, by name."""
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def frozen_copy(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of `params`. Taken before any step (and before a resume loads trained weights), it holds the
    input model's values: the frozen target, which forwards name by passing it as their `weights`
    (erase.engine.sampling.predict), never by swapping it into the UNet."""
    return {n: p.detach().clone() for n, p in params.items()}


def autocast_castable(unet: torch.nn.Module) -> set[str]:
    """Names of the parameters that autocast always casts to its low precision before use: the weights and biases of
    linear and convolution layers. (Norm layers run in fp32 under autocast: their parameters are not in this set.)"""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {f"{m}.{n}" if m else n for m, module in unet.named_modules() if isinstance(module, kinds)
            for n, _ in module.named_parameters(recurse=False)}


def in_compute_dtype(weights: dict[str, torch.Tensor] | None, castable: set[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    """`weights` with every castable tensor (autocast_castable) already in autocast's `dtype`: a forward under autocast
    computes exactly what it computes with the fp32 tensors (autocast would make the same cast), but the cast is made once
    instead of at every UNet call that names the weights. None or no autocast: unchanged."""
    if weights is None or dtype is None:
        return weights
    return {n: w.to(dtype) if n in castable else w for n, w in weights.items()}
