"""Prompt encoding of the transformer families, as diffusers' pipelines encode (StableDiffusion3Pipeline, FluxPipeline).

SD3 / SD3.5: CLIP-L and CLIP-G, each its penultimate layer, side by side and zero-padded to the transformer's text
width, then T5's sequence after them (zeros where the file has no T5: SD3 was trained to run without it); the pooled
vector is the two CLIPs' projected outputs side by side. FLUX.1: T5's sequence is the text, CLIP-L's pooled output the
vector; FLUX.1 has no meaning without T5. The token lengths are fixed per run (training and sampling must agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from erase.errors import EraseError
from erase.models import MAX_TOKENS, Conditioning, spell

T5_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length


@dataclass
class TransformerText:
    family: str  # "sd3" | "flux"
    clip: list  # [(tokenizer, encoder)]: SD3 CLIP-L and CLIP-G (with projection), FLUX.1 CLIP-L
    t5: tuple | None  # (tokenizer, T5EncoderModel), or None (SD3 only)
    joint_dim: int  # the transformer's text width (joint_attention_dim)
    t5_length: int | None = None  # None: the pipeline's default
    clip_length: int = MAX_TOKENS
    spellings: dict[str, str] = field(default_factory=dict)  # multi-vector embedding token -> "tok tok_1 ..." (erase.embeddings)
    # how T5 reads a prompt written in CLIP's added tokens (UnlearnDiffAtk's prefix stand-ins as the words they are now:
    # erase.attack.prefix); None: as written
    plain_words: Callable[[str], str] | None = None

    def __post_init__(self) -> None:
        if self.family == "flux" and self.t5 is None:
            raise EraseError("FLUX.1 reads its prompt through T5: give the T5 encoder (--text-encoders)")
        self.t5_length = self.t5_length or T5_LENGTH[self.family]

    @property
    def tokenizers(self) -> list:
        """The tokenizer whose positions the sequence's first tokens follow (SD3: CLIP's; FLUX.1: T5's), for the
        preserved concepts' similarity (erase.engine.preserve)."""
        return [self.clip[0][0]] if self.family == "sd3" else [self.t5[0]]

    @property
    def towers(self) -> list[tuple]:
        """(tokenizer, encoder) of every tower (the CLIPs, then T5): where textual-inversion tokens and attack prefixes
        are added (erase.embeddings, erase.attack.prefix)."""
        return [*self.clip, *([self.t5] if self.t5 else [])]

    @property
    def encoders(self) -> list:
        """Every tower, for moving them off the GPU once the prompts are encoded."""
        return [enc for _, enc in self.towers]

    def _t5(self, prompts: list[str], device) -> torch.Tensor:
        if self.t5 is None:
            return torch.zeros(len(prompts), self.t5_length, self.joint_dim, device=device)
        tok, enc = self.t5
        if self.plain_words is not None:
            prompts = [self.plain_words(p) for p in prompts]
        ids = tok(prompts, padding="max_length", max_length=self.t5_length, truncation=True, add_special_tokens=True,
                  return_tensors="pt").input_ids
        return enc(ids.to(device))[0].float()

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device = "cpu", length: int | None = None) -> Conditioning:
        """The token sequence (B, L, joint_dim) and the pooled vector (B, P), fp32. `length` is taken for the Stable
        Diffusion encoders' signature and not used: these families' lengths are fixed (CLIP 77, T5 `t5_length`)."""
        return self.forward(prompts, device)

    def forward(self, prompts: list[str], device: str | torch.device = "cpu", length: int | None = None) -> Conditioning:
        """`encode` with gradients (textual inversion and the attacks train token rows through it)."""
        prompts = [spell(p, self.spellings) for p in prompts] if self.spellings else prompts
        hidden, pooled = [], []
        for tok, enc in self.clip:
            ids = tok(prompts, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt").input_ids
            out = enc(ids.to(device), output_hidden_states=self.family == "sd3")
            if self.family == "sd3":
                hidden.append(out.hidden_states[-2].float())
                pooled.append(out[0].float())  # the projected text embedding
            else:
                pooled.append(out.pooler_output.float())
        t5 = self._t5(prompts, device)
        if self.family == "flux":
            return Conditioning(t5, pooled[0])
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))


CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}  # the released towers' activations (not in the weights)


def _encoder_state(ckpt, name: str) -> dict[str, torch.Tensor]:
    """A carried encoder's tensors under its HF names: Stability's files keep the HF layout under
    `text_encoders.<name>.transformer.` (diffusers' SD3 converters only strip that prefix)."""
    prefix = f"text_encoders.{name}.transformer."
    return {k[len(prefix):]: v for k, v in ckpt.get_many([k for k in ckpt.tensors if k.startswith(prefix)]).items()}


def _clip(ckpt, name: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erase.checkpoint.model_config import indices, metadata_config
    from erase.models import _match_prefix

    state = _encoder_state(ckpt, name)
    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    cfg = {"vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": max(1, hidden // 64),
           "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
           "num_hidden_layers": len(indices(state, "text_model.encoder.layers.")),
           "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0], "hidden_act": CLIP_ACT[name],
           "projection_dim": state["text_projection.weight"].shape[0] if "text_projection.weight" in state else hidden}
    cfg.update(metadata_config(ckpt, name))
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**cfg))
    if not projection:
        state.pop("text_projection.weight", None)
    state.pop("text_model.embeddings.position_ids", None)  # a buffer transformers 5 no longer keeps
    model.load_state_dict(_match_prefix(state, model, "text_model."), strict=True)
    return model.float().eval().requires_grad_(False)


def _t5(ckpt):
    from transformers import T5Config, T5EncoderModel

    from erase.checkpoint.model_config import indices, metadata_config

    state = _encoder_state(ckpt, "t5xxl")
    bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    heads = bias.shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    cfg = {"vocab_size": state["shared.weight"].shape[0], "d_model": state["shared.weight"].shape[1], "num_heads": heads,
           "d_kv": state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
           "d_ff": state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0],
           "num_layers": len(indices(state, "encoder.block.")), "relative_attention_num_buckets": bias.shape[0],
           "feed_forward_proj": "gated-gelu" if gated else "relu"}
    cfg.update(metadata_config(ckpt, "t5xxl"))
    model = T5EncoderModel(T5Config(**cfg))
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])  # tied to `shared` in the HF model
    model.load_state_dict(state, strict=True)
    return model.float().eval().requires_grad_(False)


def load_transformer_text(ckpt, tf, joint_dim: int, *, clip_tokenizers: list, t5_tokenizer=None,
                          t5_length: int | None = None) -> tuple[TransformerText, list[str]]:
    """The text encoders a single file carries (Stability's `text_encoders.*`), as a TransformerText, and notes for the
    user. T5 is used only with its tokenizer (which no file carries); SD3 then runs without it, as it was trained to."""
    needed = ("clip_l", "clip_g") if tf.family == "sd3" else ("clip_l",)
    missing = [n for n in needed if n not in tf.text_encoders]
    if missing:
        raise EraseError(f"{ckpt.path}: the file carries no {' or '.join(missing)} text encoder: give them with --text-encoders")
    clip = [(tok, _clip(ckpt, name, projection=tf.family == "sd3")) for tok, name in zip(clip_tokenizers, needed)]
    notes, t5 = [], None
    if "t5xxl" in tf.text_encoders and t5_tokenizer is not None:
        t5 = (t5_tokenizer, _t5(ckpt))
    elif "t5xxl" in tf.text_encoders:
        notes.append("the file's T5 is not used: no file carries its tokenizer (give a diffusers SD3 folder with "
                     "--text-encoders); SD3 runs with T5's sequence zeroed, as it was also trained to")
    return TransformerText(tf.family, clip, t5, joint_dim, t5_length), notes
