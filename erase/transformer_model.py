"""An SD3 / SD3.5 or FLUX.1 single file opened for drawing or training: the transformer, the text encoders and VAE it carries
or a diffusers folder of the family gives (`--text-encoders`), and the family's flow-matching scheduler, behind the
loaders `erase generate`, `erase evaluate` and `erase run` use for a Stable Diffusion `Model` (erase.models).

A diffusers folder of either family is its own --text-encoders folder. Not built yet, and refused by name where a command
reaches it: FLUX.1-dev's negative prompts and SLD (they need the
unconditional forward a guidance-distilled model does not make). UnlearnDiffAtk's prefix is one distribution over
CLIP's words: a T5 tower reads it as text (erase.attack.prefix). A FLUX.1 without a guidance
embedder (schnell's layout, erase's shapes-world model) samples with classifier-free guidance above a scale of 1
(erase.backbones.distilled)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.backbones.interface import DenoiserModel
from erase.checkpoint.formats import Checkpoint
from erase.checkpoint.model_config import vae_config
from erase.checkpoint.transformer_config import file_pieces, load_transformer, meta_transformer, transformer_config
from erase.checkpoint.transformer_files import TransformerFile
from erase.errors import EraseError, UsageError

# what the weights do not say, as the releases' diffusers configs give it
SD3_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"dev": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                          "base_image_seq_len": 256, "max_image_seq_len": 4096},
                  "schnell": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}}


@dataclass(frozen=True)
class TransformerFamily:
    name: str  # "sd3" | "flux"
    label: str  # the release: "SD3.5 medium", ...
    prediction_type: str = "flow"


@dataclass
class TransformerModel:
    transformer = True  # the denoiser is an SD3 / FLUX.1 transformer (erase.engine.params.selects names its sets)
    ckpt: Checkpoint
    tf: TransformerFile
    text_encoders: Path | None = None  # --text-encoders: a diffusers folder of the family (its text encoders, tokenizers, VAE)
    notes: list[str] = field(default_factory=list)  # what loading left out, for the user (T5 without its tokenizer)

    def __post_init__(self) -> None:
        if self.tf.folder and self.text_encoders is None:  # a pipeline folder brings its own text encoders, VAE and scheduler
            self.text_encoders = self.ckpt.path
        if self.text_encoders is not None and not (self.text_encoders / "model_index.json").is_file():
            raise UsageError(f"--text-encoders {self.text_encoders}: not a diffusers pipeline folder (no model_index.json)")

    def check_complete(self, drawing: bool = True) -> None:
        """What the command needs (the text encoders; to draw, the VAE too) and neither the file nor --text-encoders gives,
        as one line, before anything is written."""
        if self.tf.family == "flux" and self.text_encoders is None:
            vae = ", and its files carry no VAE" if drawing else ""
            raise EraseError(f"{self.ckpt.path.name}: {self.tf.label} reads prompts through T5, whose tokenizer no file carries{vae}: "
                             "give a diffusers FLUX.1 folder with --text-encoders")
        if self.text_encoders is None:
            missing = [e for e in ("clip_l", "clip_g") if e not in self.tf.text_encoders]
            if missing:
                raise EraseError(f"{self.ckpt.path.name}: the file carries no {' or '.join(missing)} text encoder: give a diffusers "
                                 "SD3 folder with --text-encoders")
        if drawing:
            self.vae_config  # noqa: B018 (raises, naming --text-encoders, when neither has a VAE)

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

    @property
    def latent_channels(self) -> int:
        """The VAE latent's channels: SD3's transformer takes them as they are, FLUX.1's as packed 2x2 patches."""
        return self.config["in_channels"] // (4 if self.tf.family == "flux" else 1)

    def meta_unet(self):
        """The transformer on the meta device: parameter names and counts, nothing read."""
        return meta_transformer(self.ckpt, self.tf)

    def unet_param_names(self) -> list[str]:
        return [n for n, _ in self.meta_unet().named_parameters()]

    @functools.cached_property
    def pieces(self) -> list:
        """The file's tensors as row ranges of diffusers parameters (erase.checkpoint.transformer_keymap)."""
        return file_pieces(self.ckpt, self.tf)

    def read_parameters(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Transformer parameters by diffusers name, assembled from the file's (fused) tensors in the file's dtype."""
        from erase.checkpoint.transformer_keymap import assemble

        wanted = set(names)
        return assemble([p for p in self.pieces if p.name in wanted], self.ckpt.get_many)

    def file_replacements(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trained parameters (diffusers names) as the file tensors that hold them: their rows spliced into the fused
        q/k/v tensors, every other row as it was (erase.checkpoint.transformer_keymap)."""
        from erase.checkpoint.transformer_keymap import splice

        return splice(self.pieces, weights, self.ckpt.get_many)

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
        """Pixels per latent: the VAE's (file or folder); 8, the releases', when neither has one (training needs no VAE)."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1) if self._has_vae else 8

    @property
    def _has_vae(self) -> bool:
        return self._from_folder("vae") is not None or "first_stage_model.encoder.conv_in.weight" in self.ckpt

    @property
    def default_guidance(self) -> float:
        """The scale the family's diffusers pipeline draws with when not told: SD3's CFG 7.0, FLUX.1-dev's guidance input
        3.5; a FLUX.1 without a guidance embedder (schnell) 1, one forward per step (FluxPipeline's true CFG is off)."""
        if self.tf.family == "sd3":
            return 7.0
        return 3.5 if self.config.get("guidance_embeds") else 1.0

    @property
    def default_resolution(self) -> int:
        """SD3: its sample size in pixels. FLUX.1's configuration has none: its VAE's sample size where a VAE is known (the
        release's says 1024, FluxPipeline's default; the shapes-world model's 32), else 128 latent rows (1024 pixels at
        the release's VAE)."""
        if self.tf.family == "flux" and self._has_vae:
            return int(self.vae_config.get("sample_size") or 128 * self.latent_factor)
        return self.config.get("sample_size", 128) * self.latent_factor

    def load_unet(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, fp32=None):
        """The denoiser: here the transformer (the name is the one the commands ask a Stable Diffusion model for), frozen;
        `fp32(name)` picks parameters kept in fp32 from the file's own values (the trainable subset's masters)."""
        return load_transformer(self.ckpt, self.tf, dtype, device, fp32=fp32)[0].requires_grad_(False)

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

        if self.text_encoders is not None:
            text = folder_text(self.text_encoders, self.tf.family, self.config["joint_attention_dim"])
        elif self.tf.family == "flux":
            raise EraseError(f"{self.ckpt.path.name}: {self.tf.label} reads prompts through T5, whose tokenizer no file carries: "
                             "give a diffusers FLUX.1 folder with --text-encoders")
        else:
            tokenizers = [load_tokenizer("sdxl", "tokenizer"), load_tokenizer("sdxl", "tokenizer_2")]  # SD3's CLIP-L and CLIP-G pads
            text, self.notes = load_transformer_text(self.ckpt, self.tf, self.config["joint_attention_dim"], clip_tokenizers=tokenizers)
        if embeddings:  # textual-inversion tokens: one vector set per tower (the CLIPs, then T5)
            from erase.embeddings import add_embeddings, load_embeddings

            add_embeddings(text, load_embeddings(embeddings))
        return text

    def training_scheduler(self, resolution: int):
        """The scheduler the trained methods sample their trajectories with at `resolution`: the family's; FLUX.1-dev's
        resolution-dependent shift fixed for that size (its exponential shift by mu is the static shift e^mu)."""
        import math

        from diffusers import FlowMatchEulerDiscreteScheduler

        from erase.backbones.flux import mu

        scheduler = self.scheduler()
        cfg = dict(scheduler.config)
        if not cfg.get("use_dynamic_shifting"):
            return scheduler
        tokens = (resolution // self.latent_factor // 2) ** 2
        return FlowMatchEulerDiscreteScheduler.from_config({**cfg, "use_dynamic_shifting": False, "shift": math.exp(mu(tokens, cfg))})

    def scheduler(self, cls_name: str = "FlowMatchEulerDiscreteScheduler"):
        """The family's flow-matching Euler scheduler: a --text-encoders folder's own config, else the release's."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if (folder := self._from_folder("scheduler")) is not None:
            return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, local_files_only=True)
        if self.tf.family == "sd3":
            return FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER)
        return FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER["dev" if self.config["guidance_embeds"] else "schnell"])


FOLDERS = {  # (tokenizer, encoder) subfolders of the diffusers pipelines
    "sd3": {"clip": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")], "t5": ("tokenizer_3", "text_encoder_3")},
    "flux": {"clip": [("tokenizer", "text_encoder")], "t5": ("tokenizer_2", "text_encoder_2")},
}


def folder_text(folder: Path, family: str, joint_dim: int):
    """The text encoders of a diffusers SD3 / FLUX.1 folder (as the pipelines' `from_pretrained` reads them), T5 when it
    has one (FLUX.1 needs it); a missing part is one line naming it."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

    from erase.backbones.text import T5_LENGTH, TransformerText

    parts = FOLDERS[family]
    needed = [*parts["clip"], *([parts["t5"]] if family == "flux" else [])]
    missing = [d for pair in needed for d in pair if not (folder / d).is_dir()]
    if missing:
        raise EraseError(f"{folder}: no {', '.join(missing)} there (a {'FLUX.1' if family == 'flux' else 'SD3'} "
                         "pipeline folder has them)")
    clip_cls = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel

    def frozen(model):
        return model.float().eval().requires_grad_(False)

    clip = [(CLIPTokenizer.from_pretrained(folder / tok, local_files_only=True),
             frozen(clip_cls.from_pretrained(folder / enc, local_files_only=True))) for tok, enc in parts["clip"]]
    tok, enc = parts["t5"]
    t5, length = None, None
    if (folder / tok).is_dir() and (folder / enc).is_dir():
        import json

        # the sequence tower is T5 in every release; a model trained here may put a CLIP tower in its place (the
        # shapes-world FLUX.1: FluxPipeline takes any encoder whose first output is the sequence)
        arch = json.loads((folder / enc / "config.json").read_text()).get("architectures") or ["T5EncoderModel"]
        cls = CLIPTextModel if arch[0] == "CLIPTextModel" else T5EncoderModel
        tokenizer = AutoTokenizer.from_pretrained(folder / tok, local_files_only=True)
        t5 = (tokenizer, frozen(cls.from_pretrained(folder / enc, local_files_only=True)))
        # a tokenizer made for fewer tokens than the pipeline's default says the length the model was trained at
        length = min(T5_LENGTH[family], tokenizer.model_max_length)
    return TransformerText(family, clip, t5, joint_dim, length)


def open_any_model(path, prediction_type: str | None = None, text_encoders: Path | None = None, *, drawing: bool = True,
                   families: tuple[str, ...] = ("sd3", "flux"), command: str = "generate") -> DenoiserModel:
    """A Stable Diffusion `Model`, or an SD3 / SD3.5 or FLUX.1 single file or diffusers folder as a TransformerModel (the
    `families` `command` does not take are refused in one line naming the release). `drawing`: the VAE is needed too
    (not to train)."""
    from erase.checkpoint.formats import open_checkpoint
    from erase.checkpoint.transformer_files import read_transformer_file
    from erase.models import open_model

    if (tf := read_transformer_file(ckpt := open_checkpoint(path))) is None:
        if text_encoders is not None:
            raise UsageError("--text-encoders is for SD3 / FLUX.1 files, which may come without their text encoders")
        return open_model(path, prediction_type)
    if tf.family not in families:
        raise EraseError(f"unsupported: erase {command} on {tf.label} ({tf.layout}) is not built yet")
    if prediction_type is not None:
        raise UsageError(f"--prediction-type: {tf.label} predicts a flow-matching velocity; the option is for Stable Diffusion files")
    model = TransformerModel(ckpt, tf, text_encoders)
    model.check_complete(drawing)
    return model
