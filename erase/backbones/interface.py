"""The methods every model class gives the commands, whatever its family: erase.models.Model (SD 1.x / 2.x / SDXL) and
erase.transformer_model.TransformerModel (SD3 / SD3.5, FLUX.1). Methods, generate, evaluate and attack use only these
(and the backbone functions of this package); a new family is a class with these members and its backbone file."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DenoiserModel(Protocol):
    ckpt: object  # erase.checkpoint.formats.Checkpoint: the file or folder as read (tensors, metadata)
    transformer: bool  # an MMDiT family rather than a UNet (erase.backbones.rules)

    @property
    def family(self): ...  # .name, .label, .prediction_type ("epsilon" | "v_prediction" | "flow")

    @property
    def path(self) -> Path: ...

    @property
    def default_resolution(self) -> int: ...

    @property
    def default_guidance(self) -> float: ...

    @property
    def latent_factor(self) -> int: ...

    @property
    def latent_channels(self) -> int: ...

    def meta_unet(self) -> torch.nn.Module: ...  # the denoiser on the meta device: names and shapes, nothing read

    def unet_param_names(self) -> list[str]: ...

    def read_parameters(self, names: list[str]) -> dict[str, torch.Tensor]: ...  # by diffusers name, as stored

    def file_replacements(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...  # under the file's names

    def load_unet(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, fp32=None) -> torch.nn.Module: ...

    def load_vae(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module: ...

    def load_text_encoder(self, embeddings=()): ...  # .encode(prompts) -> Conditioning, .forward, .towers

    def scheduler(self, cls_name: str): ...  # the family's diffusers scheduler of that class

    def training_scheduler(self, resolution: int): ...  # the sampler the trained methods draw trajectories with


def members() -> dict[str, object]:
    """The interface's members by name (its annotations and what its body defines), for checking a model class."""
    body = {n: v for n, v in vars(DenoiserModel).items() if not n.startswith("_")}
    return {n: None for n in DenoiserModel.__annotations__} | body
