"""SD3 / SD3.5 and FLUX.1 (diffusers' names): which parameters each trainable set names. Where the text meets the image
is the joint (double) blocks' text stream (add_q_proj, add_k_proj, add_v_proj, to_add_out). SD3.5 medium's `attn2` is
image-only self-attention, and FLUX.1's single blocks share q, k and v between text and image, so neither is
cross-attention."""

from __future__ import annotations

from erase.checkpoint.transformer_files import is_text_kv

# the closed-form edits' matrix (UCE): the text embedder, the one weight that reads the text encoder's tokens as they are
# (W c, c a token). The text stream's own keys and values read hidden states that the timestep's modulation and, after
# the first block, the image have changed, so a closed form on them would not be exact; the pooled vector's embedder
# (time_text_embed.text_embedder) reads one vector per prompt and is left as it is.
CLOSED_FORM = ("context_embedder.weight",)
# the pooled vector's embedder, first layer (FLUX.1's vector_in.in_layer, SD3's y_embedder.mlp.0): it reads one vector per
# prompt and feeds every block's modulation; UCE edits it only when asked (--pooled)
POOLED = "time_text_embed.text_embedder.linear_1.weight"
TEXT_ATTENTION = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.")
# run defaults (erase.run), measured on the shapes-world FLUX.1 (benchmarks/shapes_flux.py): where a method's default
# names the text stream's keys and values, the pooled vector's embedder trains too (text-kv: circles 0.00; the keys and
# values alone leave them at 0.85, the pooled vector reaching every block's modulation); SDD's shared inner attack is
# off unless --adversarial asks (with it circles stay at 0.46 and it does not hold: UnlearnDiffAtk 0.58, CCE 0.92)
DEFAULT_TRAIN = {"xattn-kv": "text-kv"}
INNER_ATTACK_BY_DEFAULT = False
REFUSED_TRAIN: dict[str, str] = {}


def selects(name: str, which: str) -> bool:
    """Whether the trainable set `which` (not "full": erase.engine.params) holds transformer parameter `name`."""
    text = any(s in name for s in TEXT_ATTENTION)
    if which == "text-kv":
        return is_text_kv(name) or name.startswith(POOLED.rsplit(".", 1)[0] + ".")
    if which == "noxattn":
        return not text
    if which == "attn":
        return ".attn." in name or ".attn2." in name
    return text if which == "xattn" else is_text_kv(name)
