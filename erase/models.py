"""Build diffusers components from a checkpoint, lazily: only what a command asks for.

    model = open_model("v1-5.safetensors")
    unet = model.load_unet()                 # reads only model.diffusion_model.* tensors
    text = model.load_text_encoder()         # tokenizers + encoders; call .encode([...])
    vae = model.load_vae()                   # never needed for training

Tensor names are converted with diffusers' own LDM -> diffusers converters; configs come from
`checkpoint.model_config`; tokenizers from the files the project carries (never downloaded).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.checkpoint.extras import Extras, unknown_tensors
from erase.checkpoint.families import LDM_UNET, Family, detect_family
from erase.checkpoint.formats import Checkpoint, open_checkpoint
from erase.checkpoint.keymap import diffusers_to_ldm
from erase.checkpoint.model_config import (
    TEXT_ENCODER_PREFIXES,
    VAE_PREFIX,
    family_config_dir,
    scheduler_config,
    text_encoder_config,
    text_encoder_names,
    unet_config,
    vae_config,
)
from erase.errors import EraseError

VOCAB_SIZE = 49408
MAX_TOKENS = 77


def _quiet_diffusers() -> None:
    # The converters warn about EMA extraction etc. in ways that do not apply to us.
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Conditioning:
    """Prompt embeddings as the UNet takes them."""

    embeds: torch.Tensor  # (B, 77, D) encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, P) SDXL pooled text embeddings

    def __getitem__(self, idx) -> "Conditioning":
        return Conditioning(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    def repeat(self, n: int) -> "Conditioning":
        """The same prompt(s) n times over the batch."""
        return Conditioning(self.embeds.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1))

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(self.embeds.to(device, dtype), None if self.pooled is None else self.pooled.to(device, dtype))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.embeds for p in parts]), pooled)


def unet_kwargs(cond: Conditioning, resolution: int) -> dict:
    """Keyword arguments for `unet(sample, t, **kwargs)`: SDXL also needs pooled text and size ids."""
    kwargs: dict = {"encoder_hidden_states": cond.embeds}
    if cond.pooled is not None:
        b = cond.embeds.shape[0]
        time_ids = _size_ids(resolution, cond.embeds.dtype, cond.embeds.device)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(b, 1)}
    return kwargs


@functools.lru_cache(maxsize=16)
def _size_ids(resolution: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL's (original h, w, crop top, left, target h, w) for an uncropped square image at `resolution`, (1, 6), built
    once per device: not a host-to-device copy at every UNet call."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype).to(device)


def spell(prompt: str, spellings: dict[str, str]) -> str:
    """A multi-vector embedding's token written out as its vectors' tokens ("<tok>" -> "<tok> <tok>_1 ...")."""
    for token, spelled in spellings.items():
        prompt = re.sub(rf"(?<![\w<>-]){re.escape(token)}(?![\w<>-])", spelled, prompt)
    return prompt


@dataclass
class TextEncoder:
    """Tokenizer(s) + text encoder(s) of one family; `encode` returns what the UNet takes."""

    family: Family
    tokenizers: list
    encoders: list
    zeros_for_empty: bool = False  # SDXL: the empty prompt is all zeros, as SDXL was trained
    spellings: dict[str, str] = field(default_factory=dict)  # multi-vector embedding token -> "tok tok_1 ..." (erase.embeddings)

    @property
    def towers(self) -> list[tuple]:
        """(tokenizer, encoder) of each text encoder: where textual-inversion tokens and attack prefixes are added."""
        return list(zip(self.tokenizers, self.encoders))

    def spell(self, prompt: str) -> str:
        return spell(prompt, self.spellings)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device = "cpu", length: int = MAX_TOKENS) -> Conditioning:
        """Conditioning padded to `length` tokens (SD's 77). The towers' attention is causal, so a shorter `length`
        that still holds every prompt gives the same outputs at the prompts' own positions, at a fraction of the cost."""
        return self.forward(prompts, device, length)

    def forward(self, prompts: list[str], device: str | torch.device = "cpu", length: int = MAX_TOKENS) -> Conditioning:
        """`encode` with gradients (textual inversion trains a token row through it)."""
        hidden, pooled = [], None
        prompts = [self.spell(p) for p in prompts] if self.spellings else prompts
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            enc.to(device)
            out = enc(ids.to(device), output_hidden_states=True)
            if self.family.name == "sdxl":
                hidden.append(out.hidden_states[-2])  # SDXL: penultimate layer, no final norm
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            else:
                hidden.append(out.last_hidden_state)  # SD2's penultimate layer is built into the config
        cond = Conditioning(torch.cat(hidden, dim=-1).float(), None if pooled is None else pooled.float())
        if self.zeros_for_empty:
            empty = torch.tensor([p == "" for p in prompts], device=cond.embeds.device)
            cond.embeds[empty] = 0
            cond.pooled[empty] = 0
        return cond


def truncated_prompts(family: Family, prompts) -> dict[str, int]:
    """The prompts longer than the text encoder reads, with their token counts (BOS and EOS included).
    Not an error: SD itself cuts them at 77 tokens, but a user should hear that the rest was ignored."""
    tok = load_tokenizer("sdxl" if family.name in ("sd3", "flux") else family.name)  # their CLIP-L reads as SDXL's
    counts = {p: len(tok(p, truncation=False, verbose=False).input_ids) for p in dict.fromkeys(prompts)}
    return {p: n for p, n in counts.items() if n > MAX_TOKENS}


def truncation_notes(long: dict[str, int]) -> list[str]:
    """One line per prompt of `truncated_prompts`, for the user."""
    return [f'"{p[:60]}{"…" if len(p) > 60 else ""}" is {n} tokens: the text encoder reads the first {MAX_TOKENS} '
            "and ignores the rest (as Stable Diffusion does)" for p, n in long.items()]


def load_tokenizer(family: str, component: str = "tokenizer"):
    """A CLIP tokenizer from the files the project carries, checked (a missing folder loads as 2 tokens)."""
    from transformers import CLIPTokenizer

    folder = family_config_dir(family) / component
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if len(tok) != VOCAB_SIZE or tok.model_max_length != MAX_TOKENS:
        raise EraseError(f"tokenizer at {folder} is broken ({len(tok)} tokens, max length {tok.model_max_length}); reinstall erase")
    return tok


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    # transformers < 5 still lists CLIP's position ids as a buffer; the file's copy is an extra (checkpoint.extras)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = result.unexpected_keys
    if missing or unexpected:
        raise EraseError(
            f"{what}: weights do not match the inferred config (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the file may be a variant erase does not know"
        )


def _match_prefix(state: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Add or drop `prefix` so names match the module (transformers 5 dropped CLIP's "text_model.")."""
    expected = set(module.state_dict())
    out = {}
    for k, v in state.items():
        if k not in expected:
            k = k.removeprefix(prefix) if k.removeprefix(prefix) in expected else prefix + k if prefix + k in expected else k
        out[k] = v
    return out


@dataclass
class Model:
    """One checkpoint, opened: family, configs, and loaders for each component."""

    transformer = False  # a UNet (erase.transformer_model.TransformerModel: SD3 / FLUX.1)

    ckpt: Checkpoint
    family: Family
    _unet_config: dict | None = field(default=None, repr=False)

    @functools.cached_property
    def extras(self) -> Extras:
        """The tensors the file carries besides the weights (position ids, DDPM buffers, ...): never loaded."""
        return Extras.of(self.ckpt, self.family)

    @property
    def path(self) -> Path:
        return self.ckpt.path

    @property
    def unet_config(self) -> dict:
        if self._unet_config is None:
            self._unet_config = unet_config(self.ckpt, self.family)
        return self._unet_config

    default_guidance = 7.5  # the CFG scale erase has always drawn Stable Diffusion files with (diffusers' SD 1.x / 2.x default)

    @property
    def default_resolution(self) -> int:
        """Native image size: the UNet's sample size times the VAE's downscale factor
        (512 for SD1, 768 for SD2-v, 1024 for SDXL; 32 for the shapes-world model)."""
        return int(self.unet_config.get("sample_size", self.family.default_resolution // 8)) * self.latent_factor

    @property
    def latent_factor(self) -> int:
        """Pixels per latent: 2 ** (VAE levels - 1); 8 when the file carries no VAE."""
        cfg = vae_config(self.ckpt, self.family)
        return 2 ** (len(cfg["block_out_channels"]) - 1) if cfg else 8

    def unet_file_key(self, diffusers_name: str) -> str:
        """The name under which a diffusers UNet parameter is stored in this checkpoint."""
        if self.ckpt.format == "diffusers":
            return "unet/" + diffusers_name
        return LDM_UNET + diffusers_to_ldm(diffusers_name, self.unet_config)

    @property
    def latent_channels(self) -> int:
        return self.unet_config["in_channels"]

    def meta_unet(self):
        """The UNet on the meta device: parameter names and counts from the config, nothing read."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(self.unet_config)

    def file_replacements(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trained parameters (diffusers names) under the file's own names."""
        return {self.unet_file_key(n): v for n, v in weights.items()}

    def unet_param_names(self) -> list[str]:
        """The UNet's parameter names (diffusers), from its config alone (nothing is read)."""
        return [n for n, _ in self.meta_unet().named_parameters()]

    def read_parameters(self, names: list[str]) -> dict[str, torch.Tensor]:
        """UNet parameters by diffusers name, as the file stores them (its dtype)."""
        stored = self.ckpt.get_many([self.unet_file_key(n) for n in names])
        return {n: stored[self.unet_file_key(n)] for n in names}

    def unet_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's tensors with diffusers names, in the file's dtype."""
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        _quiet_diffusers()
        if self.ckpt.format == "diffusers":
            names = [k for k in self.ckpt.tensors if k.startswith("unet/")]
            return {k[len("unet/") :]: v for k, v in self.ckpt.get_many(names).items()}
        raw = self.ckpt.get_many([k for k in self.ckpt.tensors if k.startswith(LDM_UNET)])
        return convert_ldm_unet_checkpoint(raw, self.unet_config)

    def load_unet(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, fp32=None):
        """The UNet in `dtype` on `device`, frozen. `fp32(name)` picks parameters kept in fp32 whatever `dtype` is: the
        trainable subset's master weights, taken from the file's own tensors (a copy made after a cast to bf16 would
        carry bf16's rounding into every trained tensor, even at lr 0)."""
        from diffusers import UNet2DConditionModel

        _quiet_diffusers()
        with torch.device("meta"):  # no random init: every weight comes from the file
            unet = UNet2DConditionModel.from_config(self.unet_config)
        _assign(unet, self.unet_state_dict(), "UNet")
        # own copies: the loaded tensors may share memory with the opened file's
        masters = {n: p.detach().to(device, torch.float32, copy=True) for n, p in unet.named_parameters() if fp32 and fp32(n)}
        unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
        for n, p in unet.named_parameters():
            if n in masters:
                p.data = masters[n]
        return unet

    def training_scheduler(self, resolution: int):
        """The scheduler the trained methods sample their trajectories with: DDIM on the family's schedule."""
        return self.scheduler("DDIMScheduler")

    def load_text_encoder(self, embeddings=()) -> TextEncoder:
        """The family's tokenizers and encoders; `embeddings` (paths of textual-inversion files) add their tokens."""
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        _quiet_diffusers()
        tokenizers, encoders = [], []
        for i, comp in enumerate(text_encoder_names(self.family)):
            cfg = CLIPTextConfig(**{k: v for k, v in text_encoder_config(self.ckpt, self.family, comp).items() if k != "architectures"})
            cls = CLIPTextModelWithProjection if comp == "text_encoder_2" else CLIPTextModel
            model = cls(cfg)
            prefix = comp + "/" if self.ckpt.format == "diffusers" else TEXT_ENCODER_PREFIXES[(self.family.name, comp)][0]
            names = [k for k in self.ckpt.tensors if k.startswith(prefix) and k not in self.extras]
            if self.ckpt.format == "diffusers":
                state = {k[len(prefix):]: v for k, v in self.ckpt.get_many(names).items()}
            elif TEXT_ENCODER_PREFIXES[(self.family.name, comp)][1] == "hf":
                state = convert_ldm_clip_checkpoint(self.ckpt.get_many(names))
            else:
                state = convert_open_clip_checkpoint(model, self.ckpt.get_many(names), prefix=prefix)
            _assign(model, _match_prefix(state, model, "text_model."), comp)
            # fp32 whatever the file's dtype (as the reference encodes): prompts are encoded once per run, and an fp16
            # encoder moves the embeddings by up to 3e-3 on the shapes model
            model = model.float()
            tokenizers.append(load_tokenizer(self.family.name, "tokenizer" if i == 0 else "tokenizer_2"))
            encoders.append(model.eval().requires_grad_(False))
        text = TextEncoder(self.family, tokenizers, encoders, zeros_for_empty=self.family.name == "sdxl")
        if embeddings:
            from erase.embeddings import add_embeddings, load_embeddings

            add_embeddings(text, load_embeddings(embeddings))
        return text

    def load_vae(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        _quiet_diffusers()
        cfg = vae_config(self.ckpt, self.family)
        if cfg is None:
            raise EraseError(f"{self.path}: the file carries no VAE (first_stage_model.*), which generating images needs")
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(cfg)
        if self.ckpt.format == "diffusers":
            names = [k for k in self.ckpt.tensors if k.startswith("vae/")]
            state = {k[4:]: v for k, v in self.ckpt.get_many(names).items()}
        else:
            raw = self.ckpt.get_many([k for k in self.ckpt.tensors if k.startswith(VAE_PREFIX)])
            state = convert_ldm_vae_checkpoint(raw, cfg)
        _assign(vae, state, "VAE")
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def scheduler(self, cls_name: str = "DDIMScheduler"):
        import diffusers

        cfg = {k: v for k, v in scheduler_config(self.ckpt, self.family).items() if not k.startswith("_")}
        return getattr(diffusers, cls_name).from_config(cfg)


def open_model(path: str | os.PathLike, prediction_type: str | None = None) -> Model:
    """Open a checkpoint as a model; a file carrying tensors erase does not know is refused (nothing is guessed)."""
    ckpt = open_checkpoint(path)
    model = Model(ckpt=ckpt, family=detect_family(ckpt, prediction_type))
    unknown = unknown_tensors(ckpt, model.family, model.extras)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise EraseError(f"{ckpt.path.name}: {model.family.label} checkpoint with tensors erase does not know: "
                         f"{', '.join(unknown[:3])}{more}; refusing to guess what they are")
    return model


def write_config_folder(model: Model, folder: str | os.PathLike) -> Path:
    """Write a diffusers config folder (no weights) matching `model`, for
    `from_single_file(path, config=folder, local_files_only=True)` in other tools."""
    import json
    import shutil

    folder = Path(folder)
    src = family_config_dir(model.family.name)
    shutil.copytree(src, folder, dirs_exist_ok=True)  # model_index.json and tokenizers
    configs = {"unet": model.unet_config, "vae": vae_config(model.ckpt, model.family)}
    for comp in text_encoder_names(model.family):
        configs[comp] = text_encoder_config(model.ckpt, model.family, comp)
    for comp, cfg in configs.items():
        if cfg is not None:
            (folder / comp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    sched = scheduler_config(model.ckpt, model.family)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    return folder
