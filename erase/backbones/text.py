"""Prompt encoding of the transformer families, as diffusers' pipelines encode (StableDiffusion3Pipeline, FluxPipeline).

SD3 / SD3.5: CLIP-L and CLIP-G, each its penultimate layer, side by side and zero-padded to the transformer's text
width, then T5's sequence after them (zeros where the file has no T5: SD3 was trained to run without it); the pooled
vector is the two CLIPs' projected outputs side by side. FLUX.1: T5's sequence is the text, CLIP-L's pooled output the
vector; FLUX.1 has no meaning without T5. The token lengths are fixed per run (training and sampling must agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.errors import EraseError
from erase.models import MAX_TOKENS, Conditioning

T5_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length


@dataclass
class TransformerText:
    family: str  # "sd3" | "flux"
    clip: list  # [(tokenizer, encoder)]: SD3 CLIP-L and CLIP-G (with projection), FLUX.1 CLIP-L
    t5: tuple | None  # (tokenizer, T5EncoderModel), or None (SD3 only)
    joint_dim: int  # the transformer's text width (joint_attention_dim)
    t5_length: int | None = None  # None: the pipeline's default
    clip_length: int = MAX_TOKENS

    def __post_init__(self) -> None:
        if self.family == "flux" and self.t5 is None:
            raise EraseError("FLUX.1 reads its prompt through T5: give the T5 encoder (--text-encoders)")
        self.t5_length = self.t5_length or T5_LENGTH[self.family]

    def _t5(self, prompts: list[str], device) -> torch.Tensor:
        if self.t5 is None:
            return torch.zeros(len(prompts), self.t5_length, self.joint_dim, device=device)
        tok, enc = self.t5
        ids = tok(prompts, padding="max_length", max_length=self.t5_length, truncation=True, add_special_tokens=True,
                  return_tensors="pt").input_ids
        return enc(ids.to(device))[0].float()

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device = "cpu") -> Conditioning:
        """The token sequence (B, L, joint_dim) and the pooled vector (B, P), fp32."""
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
