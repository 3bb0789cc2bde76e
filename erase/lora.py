"""Export an erasure delta as a kohya/A1111 LoRA (truncated SVD per cross-attention linear layer).

For each 2-D weight delta dW (out, in):  dW ~= up @ down,  up = U_r diag(S_r) (out, r),  down = V_r^T (r, in),
alpha = r (scale alpha / r = 1), the same r for every layer (zero-padded where a layer has fewer singular values).
Relative error ||dW - up @ down||_F / ||dW||_F is printed and stored.
Names follow kohya: SD1/SD2 use diffusers module paths (`lora_unet_down_blocks_0_..._attn2_to_k`),
SDXL uses the LDM paths (`lora_unet_input_blocks_4_1_..._attn2_to_k`), as kohya's trainers write them.
SD3 / FLUX.1 LoRAs are written as diffusers writes them (`transformer.<module>.lora_A.weight` / `lora_B.weight`, no
alpha: scale 1): diffusers' `load_lora_weights` / `load_lora_adapter` read them (tested), and ComfyUI maps the layout.
Biases cannot live in a LoRA: they are reported with their size and left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from erase.checkpoint.keymap import diffusers_to_ldm
from erase.errors import UsageError
from erase.models import Model


def kohya_name(model: Model, param: str) -> str:
    module = param.rsplit(".", 1)[0]
    if model.family.name == "sdxl":
        module = diffusers_to_ldm(param, model.unet_config).rsplit(".", 1)[0]
    return "lora_unet_" + module.replace(".", "_")


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (out, rank), down (rank, in), relative Frobenius error) of the best rank-`rank` approximation. A layer with
    fewer than `rank` singular values is padded with zero rows and columns: every layer then has the same rank, so one
    alpha (= rank, scale 1) serves them all. Loaders scale each layer by alpha / its rank, and diffusers drops per-layer
    alphas of kohya-named attention layers (the mid block's to_q and to_out came back at half their size)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, S.numel())
    up = torch.zeros(delta.shape[0], rank, dtype=torch.float32)
    down = torch.zeros(rank, delta.shape[1], dtype=torch.float32)
    up[:, :r], down[:r] = (U[:, :r] * S[:r]).float(), Vh[:r].float()
    norm = delta.double().norm()
    err = float((delta.double() - up.double() @ down.double()).norm() / norm) if norm > 0 else 0.0
    return up, down, err


def export_lora(model: Model | None, delta: dict[str, torch.Tensor], out: Path, *, rank: int, sources: list[dict],
                family: str | None = None) -> dict:
    """`model`: a Stable Diffusion model (kohya names); None with `family` "sd3" / "flux": `delta` holds transformer
    parameters by diffusers name, written in diffusers' LoRA layout."""
    if rank < 1:
        raise UsageError("--lora-rank must be >= 1")
    tensors, errors, skipped = {}, {}, {}
    for name, d in sorted(delta.items()):
        if d.ndim != 2:
            skipped[name] = d.numel()  # biases (and norms) have no LoRA form
            continue
        up, down, err = low_rank(d, rank)
        if model is None:  # diffusers' layout for the transformer families
            key = "transformer." + name.rsplit(".", 1)[0]
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        else:
            key = kohya_name(model, name)
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.alpha"] = torch.tensor(float(up.shape[1]))
        errors[key] = round(err, 6)
    if not tensors:
        raise UsageError("the delta has no 2-D weights to express as a LoRA")
    meta = {
        "erase.kind": "lora", "erase.family": family or model.family.name, "erase.lora_rank": str(rank),
        "erase.lora_relative_errors": json.dumps(errors), "erase.lora_skipped": json.dumps(skipped),
        "erase.sources": json.dumps(sources), "erase.concepts": json.dumps(list(dict.fromkeys(c for s in sources for c in s["concepts"]))),
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
    }
    tmp = out.with_name("." + out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out)
    worst = max(errors.values())
    return {"output": str(out), "kind": "lora", "rank": rank, "layers": len(errors), "max_relative_error": worst,
            "mean_relative_error": sum(errors.values()) / len(errors), "relative_errors": errors,
            "skipped_tensors": len(skipped), "skipped_parameters": sum(skipped.values()), "sources": sources}
