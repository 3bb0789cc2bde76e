"""Checkpoint files laid out like the public Stable Diffusion releases, at any width, built without erase.

This module deliberately imports nothing from `erase`: it is a second, independent description of the
single-file layouts, written from the original model code, so that the conformance tests can disagree with
erase's loader, converters and exporter. Sources of each name:

  UNet  (`model.diffusion_model.`)  CompVis ldm `openaimodel.UNetModel`: `input_blocks` / `middle_block` /
        `output_blocks` of `ResBlock` (in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection),
        `SpatialTransformer` (norm, proj_in, transformer_blocks.N.{attn1, attn2, ff.net.0.proj, ff.net.2,
        norm1-3}, proj_out; 1x1 convs in SD 1.x, linear layers from SD 2.x on), `Downsample.op`,
        `Upsample.conv`, `time_embed.0/2`, `out.0/2`; SDXL (generative-models) adds `label_emb.0.0/2`.
  VAE   (`first_stage_model.`)  ldm `AutoencoderKL`: encoder/decoder `down.i.block.j` / `up.i.block.j`
        (norm1, conv1, norm2, conv2, nin_shortcut), `mid.block_1/attn_1/block_2` (attention q/k/v/proj_out
        stored as 1x1 convs), `quant_conv`, `post_quant_conv`.
  Text  HF `CLIPTextModel` under `cond_stage_model.transformer.` (SD 1.x) and `conditioner.embedders.0.
        transformer.` (SDXL), with `embeddings.position_ids` int64 [1, 77]; OpenCLIP `TextTransformer` under
        `cond_stage_model.model.` (SD 2.x, all 24 blocks stored) and `conditioner.embedders.1.model.` (SDXL
        bigG): `transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
        `positional_embedding`, `token_embedding`, `ln_final`, `text_projection` [width, proj], `logit_scale`.
  Extras CompVis `DDPM.register_schedule` buffers (fp32 [1000]); LitEma's `model_ema.decay` (fp32 []) and
        `model_ema.num_updates` (int32 []), and in the full (non-pruned) files one `model_ema.<name without
        dots>` per UNet parameter.
Key counts at the real widths: SD 1.5 has 686 UNet, 248 VAE and 197 CLIP tensors (the counts that model
toolkits list for v1-5-pruned-emaonly), plus 12 schedule buffers and 2 EMA scalars.

    layout = sd15(width=32)                        # the real names, tiny tensors
    state = layout.state_dict(torch.float16)       # {name: tensor}
    write_streamed(layout, "sd15.safetensors")     # any size, one tensor in memory at a time
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


@dataclass(frozen=True)
class Spec:
    """One tensor of a layout: its name, shape, and how its values are made."""

    name: str
    shape: tuple[int, ...]
    kind: str = "weight"  # weight | bias | norm | embedding | position_ids | buffer | scalar | count


@dataclass
class TextTower:
    prefix: str  # e.g. "cond_stage_model.transformer."
    layout: str  # "hf" | "openclip"
    width: int
    layers: int
    projection: int | None = None  # OpenCLIP text_projection width
    vocab: int = 49408
    positions: int = 77


@dataclass
class Layout:
    """A release's tensor layout at some width. `specs()` lists every tensor in file order."""

    name: str
    channels: tuple[int, ...]  # UNet channels per level (model_channels * channel_mult)
    attention: tuple[int, ...]  # transformer depth per level (0: no attention at that level)
    middle_depth: int
    context: int  # cross-attention width
    linear_proj: bool  # SpatialTransformer proj_in/out as linear layers (SD 2.x, SDXL) or 1x1 convs (SD 1.x)
    text: list[TextTower]
    res_blocks: int = 2
    adm_in: int | None = None  # SDXL label_emb input width
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)
    ddpm_buffers: bool = True
    ema_scalars: bool = True
    ema_weights: bool = False
    extra: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, kind)

    # -- the UNet ------------------------------------------------------------------------------------
    def _resblock(self, p: str, cin: int, cout: int, emb: int) -> list[Spec]:
        out = [Spec(p + "in_layers.0.weight", (cin,), "norm"), Spec(p + "in_layers.0.bias", (cin,), "bias"),
               Spec(p + "in_layers.2.weight", (cout, cin, 3, 3)), Spec(p + "in_layers.2.bias", (cout,), "bias"),
               Spec(p + "emb_layers.1.weight", (cout, emb)), Spec(p + "emb_layers.1.bias", (cout,), "bias"),
               Spec(p + "out_layers.0.weight", (cout,), "norm"), Spec(p + "out_layers.0.bias", (cout,), "bias"),
               Spec(p + "out_layers.3.weight", (cout, cout, 3, 3)), Spec(p + "out_layers.3.bias", (cout,), "bias")]
        if cin != cout:
            out += [Spec(p + "skip_connection.weight", (cout, cin, 1, 1)), Spec(p + "skip_connection.bias", (cout,), "bias")]
        return out

    def _transformer(self, p: str, ch: int, depth: int) -> list[Spec]:
        proj = (ch, ch) if self.linear_proj else (ch, ch, 1, 1)
        out = [Spec(p + "norm.weight", (ch,), "norm"), Spec(p + "norm.bias", (ch,), "bias"),
               Spec(p + "proj_in.weight", proj), Spec(p + "proj_in.bias", (ch,), "bias")]
        for d in range(depth):
            b = f"{p}transformer_blocks.{d}."
            for attn, kv in (("attn1", ch), ("attn2", self.context)):
                out += [Spec(f"{b}{attn}.to_q.weight", (ch, ch)), Spec(f"{b}{attn}.to_k.weight", (ch, kv)),
                        Spec(f"{b}{attn}.to_v.weight", (ch, kv)), Spec(f"{b}{attn}.to_out.0.weight", (ch, ch)),
                        Spec(f"{b}{attn}.to_out.0.bias", (ch,), "bias")]
            out += [Spec(b + "ff.net.0.proj.weight", (8 * ch, ch)), Spec(b + "ff.net.0.proj.bias", (8 * ch,), "bias"),  # GEGLU
                    Spec(b + "ff.net.2.weight", (ch, 4 * ch)), Spec(b + "ff.net.2.bias", (ch,), "bias")]
            for n in (1, 2, 3):
                out += [Spec(f"{b}norm{n}.weight", (ch,), "norm"), Spec(f"{b}norm{n}.bias", (ch,), "bias")]
        return out + [Spec(p + "proj_out.weight", proj), Spec(p + "proj_out.bias", (ch,), "bias")]

    def unet(self) -> list[Spec]:
        mc, emb = self.channels[0], 4 * self.channels[0]
        out = [Spec(UNET + "time_embed.0.weight", (emb, mc)), Spec(UNET + "time_embed.0.bias", (emb,), "bias"),
               Spec(UNET + "time_embed.2.weight", (emb, emb)), Spec(UNET + "time_embed.2.bias", (emb,), "bias")]
        if self.adm_in:
            out += [Spec(UNET + "label_emb.0.0.weight", (emb, self.adm_in)), Spec(UNET + "label_emb.0.0.bias", (emb,), "bias"),
                    Spec(UNET + "label_emb.0.2.weight", (emb, emb)), Spec(UNET + "label_emb.0.2.bias", (emb,), "bias")]
        out += [Spec(UNET + "input_blocks.0.0.weight", (mc, 4, 3, 3)), Spec(UNET + "input_blocks.0.0.bias", (mc,), "bias")]
        skips, ch, index = [mc], mc, 1
        for level, cout in enumerate(self.channels):
            for _ in range(self.res_blocks):
                out += self._resblock(f"{UNET}input_blocks.{index}.0.", ch, cout, emb)
                ch = cout
                if self.attention[level]:
                    out += self._transformer(f"{UNET}input_blocks.{index}.1.", ch, self.attention[level])
                skips.append(ch)
                index += 1
            if level != len(self.channels) - 1:
                out += [Spec(f"{UNET}input_blocks.{index}.0.op.weight", (ch, ch, 3, 3)),
                        Spec(f"{UNET}input_blocks.{index}.0.op.bias", (ch,), "bias")]
                skips.append(ch)
                index += 1
        out += self._resblock(UNET + "middle_block.0.", ch, ch, emb)
        out += self._transformer(UNET + "middle_block.1.", ch, self.middle_depth)
        out += self._resblock(UNET + "middle_block.2.", ch, ch, emb)
        index = 0
        for level in reversed(range(len(self.channels))):
            cout = self.channels[level]
            for i in range(self.res_blocks + 1):
                p = f"{UNET}output_blocks.{index}."
                out += self._resblock(p + "0.", ch + skips.pop(), cout, emb)
                ch, sub = cout, 1
                if self.attention[level]:
                    out += self._transformer(p + "1.", ch, self.attention[level])
                    sub = 2
                if level and i == self.res_blocks:
                    out += [Spec(f"{p}{sub}.conv.weight", (ch, ch, 3, 3)), Spec(f"{p}{sub}.conv.bias", (ch,), "bias")]
                index += 1
        mc = self.channels[0]
        return out + [Spec(UNET + "out.0.weight", (mc,), "norm"), Spec(UNET + "out.0.bias", (mc,), "bias"),
                      Spec(UNET + "out.2.weight", (4, mc, 3, 3)), Spec(UNET + "out.2.bias", (4,), "bias")]

    # -- the VAE -------------------------------------------------------------------------------------
    @staticmethod
    def _vae_block(p: str, cin: int, cout: int) -> list[Spec]:
        out = [Spec(p + "norm1.weight", (cin,), "norm"), Spec(p + "norm1.bias", (cin,), "bias"),
               Spec(p + "conv1.weight", (cout, cin, 3, 3)), Spec(p + "conv1.bias", (cout,), "bias"),
               Spec(p + "norm2.weight", (cout,), "norm"), Spec(p + "norm2.bias", (cout,), "bias"),
               Spec(p + "conv2.weight", (cout, cout, 3, 3)), Spec(p + "conv2.bias", (cout,), "bias")]
        if cin != cout:
            out += [Spec(p + "nin_shortcut.weight", (cout, cin, 1, 1)), Spec(p + "nin_shortcut.bias", (cout,), "bias")]
        return out

    def _vae_mid(self, p: str, c: int) -> list[Spec]:
        out = self._vae_block(p + "mid.block_1.", c, c)
        a = p + "mid.attn_1."
        out += [Spec(a + "norm.weight", (c,), "norm"), Spec(a + "norm.bias", (c,), "bias")]
        for n in ("q", "k", "v", "proj_out"):
            out += [Spec(f"{a}{n}.weight", (c, c, 1, 1)), Spec(f"{a}{n}.bias", (c,), "bias")]
        return out + self._vae_block(p + "mid.block_2.", c, c)

    def vae(self, z: int = 4) -> list[Spec]:
        chs, e, d = self.vae_channels, VAE + "encoder.", VAE + "decoder."
        out = [Spec(e + "conv_in.weight", (chs[0], 3, 3, 3)), Spec(e + "conv_in.bias", (chs[0],), "bias")]
        cin = chs[0]
        for i, cout in enumerate(chs):
            for j in range(2):
                out += self._vae_block(f"{e}down.{i}.block.{j}.", cin, cout)
                cin = cout
            if i != len(chs) - 1:
                out += [Spec(f"{e}down.{i}.downsample.conv.weight", (cout, cout, 3, 3)),
                        Spec(f"{e}down.{i}.downsample.conv.bias", (cout,), "bias")]
        out += self._vae_mid(e, cin)
        out += [Spec(e + "norm_out.weight", (cin,), "norm"), Spec(e + "norm_out.bias", (cin,), "bias"),
                Spec(e + "conv_out.weight", (2 * z, cin, 3, 3)), Spec(e + "conv_out.bias", (2 * z,), "bias")]
        cin = chs[-1]
        out += [Spec(d + "conv_in.weight", (cin, z, 3, 3)), Spec(d + "conv_in.bias", (cin,), "bias")]
        out += self._vae_mid(d, cin)
        for i in reversed(range(len(chs))):
            for j in range(3):
                out += self._vae_block(f"{d}up.{i}.block.{j}.", cin, chs[i])
                cin = chs[i]
            if i != 0:
                out += [Spec(f"{d}up.{i}.upsample.conv.weight", (cin, cin, 3, 3)), Spec(f"{d}up.{i}.upsample.conv.bias", (cin,), "bias")]
        out += [Spec(d + "norm_out.weight", (chs[0],), "norm"), Spec(d + "norm_out.bias", (chs[0],), "bias"),
                Spec(d + "conv_out.weight", (3, chs[0], 3, 3)), Spec(d + "conv_out.bias", (3,), "bias")]
        return out + [Spec(VAE + "quant_conv.weight", (2 * z, 2 * z, 1, 1)), Spec(VAE + "quant_conv.bias", (2 * z,), "bias"),
                      Spec(VAE + "post_quant_conv.weight", (z, z, 1, 1)), Spec(VAE + "post_quant_conv.bias", (z,), "bias")]

    # -- text towers ---------------------------------------------------------------------------------
    @staticmethod
    def _text(t: TextTower) -> list[Spec]:
        w, p = t.width, t.prefix
        if t.layout == "hf":
            m = p + "text_model."
            out = [Spec(m + "embeddings.token_embedding.weight", (t.vocab, w), "embedding"),
                   Spec(m + "embeddings.position_embedding.weight", (t.positions, w), "embedding"),
                   Spec(m + "embeddings.position_ids", (1, t.positions), "position_ids")]
            for n in range(t.layers):
                b = f"{m}encoder.layers.{n}."
                for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                    out += [Spec(f"{b}self_attn.{proj}.weight", (w, w)), Spec(f"{b}self_attn.{proj}.bias", (w,), "bias")]
                out += [Spec(b + "layer_norm1.weight", (w,), "norm"), Spec(b + "layer_norm1.bias", (w,), "bias"),
                        Spec(b + "mlp.fc1.weight", (4 * w, w)), Spec(b + "mlp.fc1.bias", (4 * w,), "bias"),
                        Spec(b + "mlp.fc2.weight", (w, 4 * w)), Spec(b + "mlp.fc2.bias", (w,), "bias"),
                        Spec(b + "layer_norm2.weight", (w,), "norm"), Spec(b + "layer_norm2.bias", (w,), "bias")]
            return out + [Spec(m + "final_layer_norm.weight", (w,), "norm"), Spec(m + "final_layer_norm.bias", (w,), "bias")]
        out = [Spec(p + "positional_embedding", (t.positions, w), "embedding"),
               Spec(p + "text_projection", (w, t.projection or w)), Spec(p + "logit_scale", (), "scalar"),
               Spec(p + "token_embedding.weight", (t.vocab, w), "embedding")]
        for n in range(t.layers):
            b = f"{p}transformer.resblocks.{n}."
            out += [Spec(b + "ln_1.weight", (w,), "norm"), Spec(b + "ln_1.bias", (w,), "bias"),
                    Spec(b + "attn.in_proj_weight", (3 * w, w)), Spec(b + "attn.in_proj_bias", (3 * w,), "bias"),
                    Spec(b + "attn.out_proj.weight", (w, w)), Spec(b + "attn.out_proj.bias", (w,), "bias"),
                    Spec(b + "ln_2.weight", (w,), "norm"), Spec(b + "ln_2.bias", (w,), "bias"),
                    Spec(b + "mlp.c_fc.weight", (4 * w, w)), Spec(b + "mlp.c_fc.bias", (4 * w,), "bias"),
                    Spec(b + "mlp.c_proj.weight", (w, 4 * w)), Spec(b + "mlp.c_proj.bias", (w,), "bias")]
        return out + [Spec(p + "ln_final.weight", (w,), "norm"), Spec(p + "ln_final.bias", (w,), "bias")]

    # -- the whole file ------------------------------------------------------------------------------
    def specs(self) -> list[Spec]:
        out: list[Spec] = []
        if self.ddpm_buffers:
            out += [Spec(n, (1000,), "buffer") for n in DDPM_BUFFERS]
        unet = self.unet()
        out += unet
        out += self.vae()
        for t in self.text:
            out += self._text(t)
        if self.ema_scalars:
            out += [Spec("model_ema.decay", (), "scalar"), Spec("model_ema.num_updates", (), "count")]
        if self.ema_weights:  # LitEma: "model_ema." + the DiffusionWrapper's parameter name without its dots
            out += [Spec("model_ema." + s.name[len("model."):].replace(".", ""), s.shape, s.kind) for s in unet]
        out += [Spec(n, shape, kind) for n, (shape, kind) in self.extra.items()]
        return out

    def attn2_names(self) -> set[str]:
        return {s.name for s in self.unet() if ".attn2." in s.name}

    def state_dict(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {s.name: make_tensor(s, dtype, g) for s in self.specs()}


def _schedule() -> dict[str, torch.Tensor]:
    """SD's scaled-linear schedule (0.00085 .. 0.012, 1000 steps) and the buffers derived from it, in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
    post_var = betas * (1 - prev) / (1 - alphas)
    return {"betas": betas, "alphas_cumprod": alphas, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": alphas.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas).sqrt(), "log_one_minus_alphas_cumprod": (1 - alphas).log(),
            "sqrt_recip_alphas_cumprod": (1 / alphas).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / alphas - 1).sqrt(),
            "posterior_variance": post_var, "posterior_log_variance_clipped": torch.log(torch.clamp(post_var, min=1e-20)),
            "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas),
            "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas)}


def make_tensor(spec: Spec, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Values that keep a randomly initialised model's activations finite (a fixed seed: reproducible files)."""
    if spec.kind == "position_ids":
        return torch.arange(spec.shape[1], dtype=torch.int64)[None]
    if spec.kind == "count":
        return torch.tensor(0, dtype=torch.int32)
    if spec.kind == "buffer":
        return _schedule()[spec.name].to(dtype)
    if spec.kind == "scalar":
        return torch.tensor(0.9999 if spec.name.endswith("decay") else math.log(100.0), dtype=dtype)
    if spec.kind == "norm":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.kind == "bias":
        return (0.01 * torch.randn(spec.shape, generator=g)).to(dtype)
    if spec.kind == "embedding":
        return (0.02 * torch.randn(spec.shape, generator=g)).to(dtype)
    fan_in = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else spec.shape[0]
    return (torch.randn(spec.shape, generator=g) / math.sqrt(fan_in)).to(dtype)


# -- the releases ----------------------------------------------------------------------------------------
def _scaled(width: int, real: tuple[int, ...]) -> tuple[int, ...]:
    """Real channel counts scaled so that the first is `width` (320 -> width)."""
    return tuple(c * width // real[0] for c in real)


VAE_CHANNELS = (128, 256, 512, 512)


def sd15(width: int = 320, text_width: int = 768, vae_width: int = 128, *, ema_weights: bool = False) -> Layout:
    """v1-5-pruned-emaonly (ema_weights=False) or v1-5-pruned (with the model_ema.* copy)."""
    return Layout("sd15", channels=_scaled(width, (320, 640, 1280, 1280)), attention=(1, 1, 1, 0), middle_depth=1,
                  context=text_width, linear_proj=False, vae_channels=_scaled(vae_width, VAE_CHANNELS),
                  text=[TextTower("cond_stage_model.transformer.", "hf", text_width, 12)], ema_weights=ema_weights)


def sd21_v(width: int = 320, text_width: int = 1024, vae_width: int = 128) -> Layout:
    """v2-1_768-ema-pruned: OpenCLIP ViT-H text tower (24 blocks stored, the penultimate one used)."""
    return Layout("sd21-v", channels=_scaled(width, (320, 640, 1280, 1280)), attention=(1, 1, 1, 0), middle_depth=1,
                  context=text_width, linear_proj=True, vae_channels=_scaled(vae_width, VAE_CHANNELS),
                  text=[TextTower("cond_stage_model.model.", "openclip", text_width, 24, projection=text_width)])


def sdxl_base(width: int = 320, clip_l: int = 768, clip_g: int = 1280, vae_width: int = 128) -> Layout:
    """sd_xl_base_1.0: CLIP-L (HF layout, position ids) + OpenCLIP bigG (projection); no DDPM buffers or EMA."""
    return Layout("sdxl-base", channels=_scaled(width, (320, 640, 1280)), attention=(0, 2, 10), middle_depth=10,
                  context=clip_l + clip_g, linear_proj=True, adm_in=clip_g + 6 * 256,
                  vae_channels=_scaled(vae_width, VAE_CHANNELS),
                  text=[TextTower("conditioner.embedders.0.transformer.", "hf", clip_l, 12),
                        TextTower("conditioner.embedders.1.model.", "openclip", clip_g, 32, projection=clip_g)],
                  ddpm_buffers=False, ema_scalars=False)


# -- files ------------------------------------------------------------------------------------------------
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


def tensor_dtype(spec: Spec, dtype: torch.dtype) -> torch.dtype:
    return {"position_ids": torch.int64, "count": torch.int32}.get(spec.kind, dtype)


def write_streamed(layout: Layout, path, dtype: torch.dtype = torch.float16, *, seed: int = 0, metadata: dict | None = None) -> int:
    """Write `layout` as .safetensors one tensor at a time (a 2 GB file never sits in memory). Returns its size."""
    specs = layout.specs()
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in specs:
        dt = tensor_dtype(s, dtype)
        n = math.prod(s.shape) * torch.empty((), dtype=dt).element_size()
        header[s.name] = {"dtype": _ST_DTYPE[dt], "shape": list(s.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = make_tensor(s, tensor_dtype(s, dtype), g).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return 8 + len(raw) + offset
