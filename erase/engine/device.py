"""Device and precision choices, shared by `run` and `generate`."""

from __future__ import annotations

import resource

import torch

from erase.errors import UsageError

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, not '{name}'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to PyTorch here (use --device cpu)")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (Ampere, compute capability 8.0, and newer).
    `torch.cuda.is_bf16_supported()` also says yes on T4 / V100, where bf16 is emulated: no tensor cores, no flash
    attention, slower than fp16."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None, str]:
    """(dtype of the frozen weights, autocast dtype or None, label).

    `auto` = bf16 autocast on GPUs with native bf16, fp16 autocast with loss scaling (the trainer's GradScaler) on older
    ones, fp32 on the CPU. Trainable parameters always keep fp32 master weights.
    """
    if name not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{name}'")
    if name == "auto":
        if device.type != "cuda":
            return torch.float32, None, "fp32"
        name = "bf16" if native_bf16(device) else "fp16"
    if name == "fp32":
        return torch.float32, None, "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    scaling = ", loss scaling" if dtype == torch.float16 else ""
    return dtype, dtype, f"{name} autocast{scaling}, fp32 master weights for trainable parameters"


def enable_fast_math(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """TF32 for the fp32 matmuls and convolutions left under mixed precision (Ampere and newer); never under
    `--precision fp32`, which promises fp32 arithmetic. Returns whether TF32 is on."""
    if device.type != "cuda":
        return False
    tf32 = autocast_dtype is not None
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 replaced allow_tf32 with this
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return tf32


def configure_attention(unet, xformers: bool, device: torch.device) -> str:
    """xformers' memory-efficient attention when asked for (CUDA, installed: a clear error otherwise, never a silent
    fallback), else PyTorch's scaled-dot-product attention. Returns what the UNet now uses."""
    if xformers:
        check_xformers(device)
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"


def check_xformers(device: torch.device) -> None:
    """--xformers can work here (a CUDA device and the package), or a usage error that says what is missing."""
    if device.type != "cuda":
        raise UsageError("--xformers needs a CUDA device")
    try:
        import xformers as _  # noqa: F401
    except ImportError:
        raise UsageError("--xformers: the xformers package is not installed (pip install 'erase[cuda]')") from None


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"kind": "process_max_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
