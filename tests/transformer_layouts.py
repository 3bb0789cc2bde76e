"""SD3 / SD3.5 and FLUX.1 single files as their publishers name the tensors, at any width (tests only).

Written from the release layouts (Stability's `sd3.5_*.safetensors`, Black Forest Labs' `flux1-*.safetensors`), not from
erase's own code: tests check them against diffusers' single-file converters, which know those layouts."""

from __future__ import annotations

import torch


def sd3_shapes(width: int = 32, heads: int = 2, depth: int = 2, *, dual: tuple[int, ...] = (), qk_norm: bool = True,
               in_channels: int = 16, patch: int = 2, joint_dim: int = 32, pooled_dim: int = 48, pos_max: int = 16,
               text_encoders: tuple[str, ...] = (), vae: bool = False, prefix: str = "model.diffusion_model.") -> dict[str, tuple]:
    """Name -> shape of an SD3 (qk_norm False, dual ()), SD3.5 large (qk_norm) or SD3.5 medium (dual: its MMDiT-X blocks)."""
    w, hd = width, width // heads
    s = {"pos_embed": (1, pos_max * pos_max, w), "x_embedder.proj.weight": (w, in_channels, patch, patch), "x_embedder.proj.bias": (w,),
         "t_embedder.mlp.0.weight": (w, 256), "t_embedder.mlp.0.bias": (w,), "t_embedder.mlp.2.weight": (w, w), "t_embedder.mlp.2.bias": (w,),
         "y_embedder.mlp.0.weight": (w, pooled_dim), "y_embedder.mlp.0.bias": (w,), "y_embedder.mlp.2.weight": (w, w), "y_embedder.mlp.2.bias": (w,),
         "context_embedder.weight": (w, joint_dim), "context_embedder.bias": (w,),
         "final_layer.linear.weight": (patch * patch * in_channels, w), "final_layer.linear.bias": (patch * patch * in_channels,),
         "final_layer.adaLN_modulation.1.weight": (2 * w, w), "final_layer.adaLN_modulation.1.bias": (2 * w,)}

    def attention(name: str, out: bool = True) -> None:
        s[f"{name}.qkv.weight"], s[f"{name}.qkv.bias"] = (3 * w, w), (3 * w,)
        if out:
            s[f"{name}.proj.weight"], s[f"{name}.proj.bias"] = (w, w), (w,)
        if qk_norm:
            s[f"{name}.ln_q.weight"], s[f"{name}.ln_k.weight"] = (hd,), (hd,)

    def mlp(name: str) -> None:
        s.update({f"{name}.fc1.weight": (4 * w, w), f"{name}.fc1.bias": (4 * w,), f"{name}.fc2.weight": (w, 4 * w), f"{name}.fc2.bias": (w,)})

    for i in range(depth):
        x, c, last = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", i == depth - 1
        mods = 9 if i in dual else 6  # MMDiT-X: three more modulations for the second attention
        s[f"{x}.adaLN_modulation.1.weight"], s[f"{x}.adaLN_modulation.1.bias"] = (mods * w, w), (mods * w,)
        attention(f"{x}.attn")
        if i in dual:
            attention(f"{x}.attn2")
        mlp(f"{x}.mlp")
        # the last block's text stream is "pre only": its keys and values feed the image, nothing comes out of it
        s[f"{c}.adaLN_modulation.1.weight"], s[f"{c}.adaLN_modulation.1.bias"] = ((2 if last else 6) * w, w), ((2 if last else 6) * w,)
        attention(f"{c}.attn", out=not last)
        if not last:
            mlp(f"{c}.mlp")
    out = {prefix + k: v for k, v in s.items()}
    for e in text_encoders:  # a token embedding stands for each encoder (erase reads only that they are there)
        out[f"text_encoders.{e}.transformer.{'shared' if e == 't5xxl' else 'text_model.embeddings.token_embedding'}.weight"] = (64, 8)
    if vae:
        out["first_stage_model.decoder.conv_in.weight"] = (8, 16, 3, 3)
    return out


def flux_shapes(width: int = 32, heads: int = 2, double: int = 2, single: int = 2, *, guidance: bool = True, in_channels: int = 64,
                joint_dim: int = 32, pooled_dim: int = 48, prefix: str = "", all_in_one: bool = False) -> dict[str, tuple]:
    """Name -> shape of a FLUX.1 transformer (dev with guidance, schnell without), as Black Forest Labs publish it;
    `all_in_one`: as ComfyUI's checkpoints carry it, prefixed, beside CLIP-L, T5-XXL and the VAE."""
    w, hd = width, width // heads
    s = {"img_in.weight": (w, in_channels), "img_in.bias": (w,), "txt_in.weight": (w, joint_dim), "txt_in.bias": (w,),
         "final_layer.linear.weight": (in_channels, w), "final_layer.linear.bias": (in_channels,),
         "final_layer.adaLN_modulation.1.weight": (2 * w, w), "final_layer.adaLN_modulation.1.bias": (2 * w,)}
    for name, first in (("time_in", 256), ("vector_in", pooled_dim)) + ((("guidance_in", 256),) if guidance else ()):
        s.update({f"{name}.in_layer.weight": (w, first), f"{name}.in_layer.bias": (w,), f"{name}.out_layer.weight": (w, w), f"{name}.out_layer.bias": (w,)})
    for i in range(double):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            s.update({f"{b}_mod.lin.weight": (6 * w, w), f"{b}_mod.lin.bias": (6 * w,),
                      f"{b}_attn.qkv.weight": (3 * w, w), f"{b}_attn.qkv.bias": (3 * w,),
                      f"{b}_attn.norm.query_norm.scale": (hd,), f"{b}_attn.norm.key_norm.scale": (hd,),
                      f"{b}_attn.proj.weight": (w, w), f"{b}_attn.proj.bias": (w,),
                      f"{b}_mlp.0.weight": (4 * w, w), f"{b}_mlp.0.bias": (4 * w,), f"{b}_mlp.2.weight": (w, 4 * w), f"{b}_mlp.2.bias": (w,)})
    for i in range(single):
        b = f"single_blocks.{i}"
        s.update({f"{b}.linear1.weight": (3 * w + 4 * w, w), f"{b}.linear1.bias": (3 * w + 4 * w,),  # q, k, v and the MLP's input
                  f"{b}.linear2.weight": (w, w + 4 * w), f"{b}.linear2.bias": (w,),
                  f"{b}.norm.query_norm.scale": (hd,), f"{b}.norm.key_norm.scale": (hd,),
                  f"{b}.modulation.lin.weight": (3 * w, w), f"{b}.modulation.lin.bias": (3 * w,)})
    out = {prefix + k: v for k, v in s.items()}
    if all_in_one:
        out.update({"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (64, 8),
                    "text_encoders.t5xxl.transformer.shared.weight": (64, 8), "vae.decoder.conv_in.weight": (8, 16, 3, 3)})
    return out


def sd3_model(width: int = 32, heads: int = 2, depth: int = 2, *, dual: tuple[int, ...] = (), qk_norm: bool = True):
    """diffusers' SD3Transformer2DModel with the configuration `sd3_shapes` writes (same defaults)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=width // heads,
                                 num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=width, pooled_projection_dim=48,
                                 out_channels=16, pos_embed_max_size=16, dual_attention_layers=dual, qk_norm="rms_norm" if qk_norm else None)


def flux_model(width: int = 32, heads: int = 2, double: int = 2, single: int = 2, *, guidance: bool = True):
    """diffusers' FluxTransformer2DModel with the configuration `flux_shapes` writes (same defaults)."""
    from diffusers import FluxTransformer2DModel

    head_dim = width // heads
    rope = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)  # the rotary axes split the head
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
                                  num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=48, guidance_embeds=guidance,
                                  axes_dims_rope=rope)


def tensors(shapes: dict[str, tuple], *, seed: int = 0, dtype=torch.bfloat16, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if device == "meta":
        return {k: torch.empty(v, device="meta", dtype=dtype) for k, v in shapes.items()}
    return {k: (torch.randn(v, generator=g) * 0.02).to(dtype) for k, v in shapes.items()}


def t5_tokenizer(words=("a", "red", "blue", "circle", "square", "cat", "dog", "photo", "of")):
    """A tiny T5-style tokenizer built in code (the real one cannot be downloaded here): whole words, `</s>` appended,
    `<pad>` 0 as T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def text_encoders(family: str, joint_dim: int = 32, seed: int = 0):
    """Tiny CLIP-L (+ CLIP-G for SD3, both with projection) and T5 encoders with their tokenizers, as diffusers' tests
    build them: {"clip": [(tokenizer, model)], "t5": (tokenizer, model)}."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from erase.models import load_tokenizer

    torch.manual_seed(seed)
    clip_tok = load_tokenizer("sd1")

    def clip(hidden: int, projection: bool):
        cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
                             vocab_size=49408, projection_dim=hidden, max_position_embeddings=77)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()

    clips = [(clip_tok, clip(8, True)), (clip_tok, clip(12, True))] if family == "sd3" else [(clip_tok, clip(16, False))]
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=joint_dim, d_kv=8, d_ff=2 * joint_dim, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8)).eval()
    return {"clip": clips, "t5": (t5_tokenizer(), t5)}
