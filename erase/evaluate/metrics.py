"""Preservation metrics between base and erased images (same prompts, same seeds).

SSIM and PSNR come from torchmetrics. CLIP score needs CLIP weights on disk (`--clip-model DIR`,
a transformers CLIP folder); LPIPS needs its VGG/AlexNet weights, which torchmetrics downloads at
run time: neither is available offline here, so each is skipped with one line saying why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _load(paths: list[Path]) -> torch.Tensor:
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]


def preservation(base: list[Path], erased: list[Path]) -> dict:
    """Per-image SSIM and PSNR of erased vs base, plus their means."""
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError:
        return {"skipped": "torchmetrics is not installed (pip install 'erase[eval]')"}
    a, b = _load(base), _load(erased)
    ssim = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
    psnr = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = torch.nan_to_num(psnr, posinf=100.0)  # identical images: cap at 100 dB
    return {"ssim_mean": float(ssim.mean()), "psnr_mean": float(psnr.mean()),
            "ssim": [round(float(x), 5) for x in ssim], "psnr": [round(float(x), 3) for x in psnr]}


def clip_score(paths: list[Path], prompts: list[str], clip_model: Path | None) -> dict:
    if clip_model is None:
        return {"skipped": "no --clip-model DIR given (CLIP weights cannot be downloaded here)"}
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(clip_model))
    images = (_load(paths) * 255).to(torch.uint8)
    metric.update(images, prompts)
    return {"clip_score": float(metric.compute())}


LPIPS_SKIPPED = {"skipped": "LPIPS needs network weights that torchmetrics downloads at run time; not available offline"}
