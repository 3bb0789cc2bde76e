"""An SD3 / SD3.5 single file opened for generation: the transformer, the text encoders and the VAE it carries, and its
flow-matching scheduler, behind the loaders `erase generate` uses for a Stable Diffusion `Model` (erase.models).

What is not built yet, and refused by name where a command reaches it: FLUX.1 (its sampler: guidance as an input, no
CFG, resolution-dependent shift), textual-inversion tokens and `--delta` on these families. `--text-encoders` (a diffusers
SD3 folder) gives what a transformer-only file lacks, T5 with its tokenizer included.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.checkpoint.formats import Checkpoint
from erase.checkpoint.model_config import vae_config
from erase.checkpoint.transformer_config import load_transformer, transformer_config
from erase.checkpoint.transformer_files import TransformerFile
from erase.errors import EraseError, UsageError

# what the weights do not say, as the releases' diffusers configs give it
SD3_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


@dataclass(frozen=True)
class TransformerFamily:
    name: str  # "sd3" | "flux"
    label: str  # the release: "SD3.5 medium", ...
    prediction_type: str = "flow"


@dataclass
class TransformerModel:
    ckpt: Checkpoint
    tf: TransformerFile
    text_encoders: Path | None = None  # --text-encoders: a diffusers folder of the family (its text encoders, tokenizers, VAE)
    notes: list[str] = field(default_factory=list)  # what loading left out, for the user (T5 without its tokenizer)

    def __post_init__(self) -> None:
        if self.text_encoders is not None and not (self.text_encoders / "model_index.json").is_file():
            raise UsageError(f"--text-encoders {self.text_encoders}: not a diffusers pipeline folder (no model_index.json)")

    def _from_folder(self, component: str) -> Path | None:
        """The folder's `component` subfolder, when --text-encoders gave one that has it."""
        if self.text_encoders is None or not (self.text_encoders / component).is_dir():
            return None
        return self.text_encoders / component

    @property
    def family(self) -> TransformerFamily:
        return TransformerFamily(self.tf.family, self.tf.label)

    @property
    def path(self) -> Path:
        return self.ckpt.path

    @functools.cached_property
    def config(self) -> dict:
        return transformer_config(self.ckpt, self.tf)

    @functools.cached_property
    def vae_config(self) -> dict:
        if (folder := self._from_folder("vae")) is not None:
            import json

            return json.loads((folder / "config.json").read_text())
        cfg = vae_config(self.ckpt, None, base=SD3_VAE)
        if cfg is None:
            raise EraseError(f"{self.ckpt.path.name}: the file carries no VAE (first_stage_model.*), which generating images needs: "
                             "give a diffusers folder of the family with --text-encoders")
        return cfg

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def default_resolution(self) -> int:
        return self.config["sample_size"] * self.latent_factor

    def load_unet(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, fp32=None):
        """The denoiser: here the transformer (the name is the one `erase generate` asks a Stable Diffusion model for)."""
        return load_transformer(self.ckpt, self.tf, dtype, device)[0].requires_grad_(False)

    def load_vae(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from diffusers import AutoencoderKL
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        if (folder := self._from_folder("vae")) is not None:
            return AutoencoderKL.from_pretrained(folder, local_files_only=True).to(device=device, dtype=dtype).eval().requires_grad_(False)
        cfg = self.vae_config
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(cfg)
        raw = self.ckpt.get_many([k for k in self.ckpt.tensors if k.startswith("first_stage_model.")])
        vae.load_state_dict(convert_ldm_vae_checkpoint(raw, cfg), strict=True, assign=True)
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def load_text_encoder(self, embeddings=()):
        from erase.backbones.text import load_transformer_text
        from erase.models import load_tokenizer

        if embeddings:
            raise UsageError(f"--embedding: textual-inversion tokens are not built for {self.tf.label} yet")
        if self.text_encoders is not None:
            return folder_text(self.text_encoders, self.tf.family, self.config["joint_attention_dim"])
        tokenizers = [load_tokenizer("sdxl", "tokenizer"), load_tokenizer("sdxl", "tokenizer_2")]  # SD3's CLIP-L and CLIP-G pads
        text, notes = load_transformer_text(self.ckpt, self.tf, self.config["joint_attention_dim"], clip_tokenizers=tokenizers)
        self.notes = notes
        return text

    def scheduler(self, cls_name: str = "FlowMatchEulerDiscreteScheduler"):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)


SD3_FOLDER = {"clip": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")], "t5": ("tokenizer_3", "text_encoder_3")}


def folder_text(folder: Path, family: str, joint_dim: int):
    """The text encoders of a diffusers SD3 folder (as `StableDiffusion3Pipeline.from_pretrained` reads them), T5 when it
    has one; a missing CLIP is one line naming it."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    from erase.backbones.text import TransformerText

    missing = [d for pair in SD3_FOLDER["clip"] for d in pair if not (folder / d).is_dir()]
    if missing:
        raise EraseError(f"--text-encoders {folder}: no {', '.join(missing)} there (an SD3 pipeline folder has them)")

    def frozen(model):
        return model.float().eval().requires_grad_(False)

    clip = [(CLIPTokenizer.from_pretrained(folder / tok, local_files_only=True),
             frozen(CLIPTextModelWithProjection.from_pretrained(folder / enc, local_files_only=True))) for tok, enc in SD3_FOLDER["clip"]]
    tok, enc = SD3_FOLDER["t5"]
    t5 = None
    if (folder / tok).is_dir() and (folder / enc).is_dir():
        t5 = (AutoTokenizer.from_pretrained(folder / tok, local_files_only=True),
              frozen(T5EncoderModel.from_pretrained(folder / enc, local_files_only=True)))
    return TransformerText(family, clip, t5, joint_dim)


def open_for_generation(path, prediction_type: str | None = None, text_encoders: Path | None = None):
    """A Stable Diffusion `Model`, or an SD3 / SD3.5 single file as a TransformerModel; other transformer files (FLUX.1,
    diffusers folders of either) are refused in one line naming the release."""
    from erase.checkpoint.formats import open_checkpoint
    from erase.checkpoint.transformer_files import read_transformer_file, refusal
    from erase.models import open_model

    if Path(path).is_dir() or (tf := read_transformer_file(ckpt := open_checkpoint(path))) is None:
        if text_encoders is not None:
            raise UsageError("--text-encoders is for SD3 files, which may come without their text encoders")
        return open_model(path, prediction_type)
    if tf.family != "sd3":
        raise EraseError(refusal(tf))
    if prediction_type is not None:
        raise UsageError(f"--prediction-type: {tf.label} predicts a flow-matching velocity; the option is for Stable Diffusion files")
    return TransformerModel(ckpt, tf, text_encoders)
