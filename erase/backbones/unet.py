"""SD 1.x / 2.x / SDXL (diffusers' UNet2DConditionModel): which parameters each trainable set names. Cross-attention is
`attn2` (to_q, to_k, to_v, to_out.0; its keys and values read the text), self-attention `attn1`."""

from __future__ import annotations

# the closed-form edits' matrices (UCE): the only weights that read the text encoder's tokens, each W c for a token c
CLOSED_FORM = (".attn2.to_k.weight", ".attn2.to_v.weight")
# run defaults (erase.run): the trainable set the methods' defaults name stays as named, SDD's shared inner attack is on
# by default (measured on the shapes-world SD: benchmarks/sweeps.json), and the sets this family has no meaning for
DEFAULT_TRAIN: dict[str, str] = {}
INNER_ATTACK_BY_DEFAULT = True
REFUSED_TRAIN = {"text-kv": "--train text-kv is for SD3 / FLUX.1 files; on {label} use xattn-kv"}


def selects(name: str, which: str) -> bool:
    """Whether the trainable set `which` (not "full": erase.engine.params) holds UNet parameter `name`."""
    if which == "text-kv":  # SD3 / FLUX.1's set (erase.run refuses it for a UNet)
        return False
    if which == "noxattn":
        return ".attn2." not in name
    if which == "attn":
        return ".attn1." in name or ".attn2." in name
    if ".attn2." not in name:
        return False
    return which == "xattn" or ".attn2.to_k." in name or ".attn2.to_v." in name
