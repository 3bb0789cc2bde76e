"""Memory bound of an erasure on SD3.5 and FLUX.1 at release size, counted from the real configs (nothing is loaded).

    python benchmarks/transformer_memory.py     writes benchmarks/transformer_memory.json

Each release's transformer and text encoders are built on the meta device from their published configs and counted;
the weights and training state of a run are erase.engine.memory.estimate's exact part, as `erase run` checks it for the
UNet families: the frozen transformer in bf16, the trained subset in fp32 with its gradient, AdamW's two moments, the EMA
(and its bf16 teacher cast) and the frozen input copy in bf16. Activations are not counted (their estimate is the
UNet's; a transformer's depends on the token count), nor are the text encoders, which are freed after encoding: their
bf16 size is its own column, what a run keeps when it must encode during training (an inner attack on the prompt).
Erasure on these families is built (tested at tiny width, measured on the shapes-world FLUX.1); at release size this
is the bound the design is held to, not a measurement of a run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "benchmarks" / "transformer_memory.json"
sys.path.insert(0, str(ROOT))

from erase.checkpoint.transformer_files import is_text_kv, is_text_stream  # noqa: E402

# the published transformer configs (diffusers' config.json of each release) and their text encoders
RELEASES = {
    "SD3.5 medium": ("sd3", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                 joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                 pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"), ("clip_l", "clip_g", "t5xxl")),
    "SD3.5 large": ("sd3", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                                joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                pos_embed_max_size=192, qk_norm="rms_norm"), ("clip_l", "clip_g", "t5xxl")),
    "FLUX.1-dev": ("flux", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True), ("clip_l", "t5xxl")),
}
TRAIN_SETS = {  # name -> what it trains, by diffusers' module names (the text stream: what only the prompt's tokens pass)
    "text k/v": is_text_kv,
    "text stream": is_text_stream,
    "all": lambda n: True,
}


def text_encoder_params(name: str) -> int:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        if name == "t5xxl":
            model = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
                                            feed_forward_proj="gated-gelu"))
        else:
            width, layers, heads = (768, 12, 12) if name == "clip_l" else (1280, 32, 20)
            model = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                                               num_attention_heads=heads, projection_dim=width))
    return sum(p.numel() for p in model.parameters())


def measure() -> dict:
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from erase.engine.memory import Plan, estimate

    encoders = {e: text_encoder_params(e) for e in ("clip_l", "clip_g", "t5xxl")}
    out = {}
    for release, (family, config, text) in RELEASES.items():
        with torch.device("meta"):
            model = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel)(**config)
        named = [(n, p.numel()) for n, p in model.named_parameters()]
        total = sum(c for _, c in named) + sum(b.numel() for b in model.buffers())  # SD3's position table is a buffer
        trainable = {s: sum(c for n, c in named if keep(n)) for s, keep in TRAIN_SETS.items()}
        rows = {}
        for s in TRAIN_SETS:
            plan = Plan(unet_params=total, trainable=trainable, train_set=s, compute_bytes=2, ema=True, frozen_copy=True, text_params=0,
                        family=family, latent_pixels=0, batch=1, gradient_checkpointing=False)
            rows[s] = {"trainable": trainable[s], "bytes": {k: v for k, v in estimate(plan).items() if k != "activations"}}
        out[release] = {"family": family, "transformer_params": total, "text_encoders": {e: encoders[e] for e in text}, "sets": rows}
    return out


def table(record: dict) -> str:
    lines = ["| release | transformer | text encoders (bf16, freed after encoding) | trained | parameters | weights + training state |",
             "|---|---|---|---|---|---|"]
    for release, r in record.items():
        enc = sum(r["text_encoders"].values())
        names = " + ".join(r["text_encoders"])
        for s, row in r["sets"].items():
            lines.append(f"| {release} | {r['transformer_params'] / 1e9:.2f} B | {names}: {2 * enc / 1e9:.1f} GB | {s} | "
                         f"{row['trainable'] / 1e6:,.1f} M | {row['bytes']['total'] / 1e9:.1f} GB |")
    return "\n".join(lines)


def main() -> None:
    record = measure()
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
