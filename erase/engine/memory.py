"""How much device memory `erase run` needs, from parameter counts alone, checked before anything is loaded.

A run that cannot fit its GPU should stop in one line that says what would fit, not after minutes of loading with an
out-of-memory traceback. Everything but the activations is exact arithmetic on the parameter counts (a UNet built on
the meta device: nothing is read):

  UNet        frozen parameters in the compute dtype; the trainable subset in fp32 (master weights)
  training    per trainable parameter: fp32 gradient 4 B, AdamW's two moments 8 B, the EMA 4 B (not at --ema-decay 0),
              the frozen input copy (preservation, frozen targets or trajectories, --adversarial) in the compute dtype
              where autocast casts it anyway (erase.engine.params.in_compute_dtype), and each step's teacher cast
  text        the text encoder stays loaded only under --adversarial
  activations what the backward keeps, in the compute dtype: ACTIVATIONS elements per latent pixel per sample for SD
              1.5's 860 M-parameter UNet (at 512 px in bf16 about 2.5 GB), scaled by the square root of the UNet's size
              (SDXL's extra parameters sit mostly in its low-resolution blocks), cut by CHECKPOINTED under
              --gradient-checkpointing. A rough estimate: `make gpu-check` records the measured peak beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
ACTIVATIONS = 300_000  # elements the backward keeps per latent pixel per sample, SD 1.5's UNet (rough)
SD15_UNET = 860_000_000
CHECKPOINTED = 1 / 6  # --gradient-checkpointing keeps the blocks' inputs and recomputes the rest
HEADROOM = 0.9  # of the free memory: the allocator's fragmentation and CUDA's own buffers


@dataclass(frozen=True)
class Plan:
    """What decides a run's memory."""

    unet_params: int
    trainable: dict[str, int]  # train set -> its parameter count
    train_set: str
    compute_bytes: int  # 2 under bf16 / fp16 autocast, 4 in fp32
    ema: bool
    frozen_copy: bool
    text_params: int  # the text encoder's, counted only when it stays loaded (--adversarial)
    family: str
    latent_pixels: int  # (resolution / 8)^2
    batch: int
    gradient_checkpointing: bool


def estimate(plan: Plan) -> dict[str, float]:
    """Bytes per component, and their total."""
    n = plan.trainable[plan.train_set]
    mixed = plan.compute_bytes < 4
    parts = {
        "unet": (plan.unet_params - n) * plan.compute_bytes + n * 4,
        "gradients and AdamW": n * (4 + 8),
        "EMA": n * 4 * plan.ema + (n * plan.compute_bytes if plan.ema and mixed else 0),
        "frozen copy": n * plan.compute_bytes * plan.frozen_copy,
        "text encoder": plan.text_params * 4,
        "activations": ACTIVATIONS * (plan.unet_params / SD15_UNET) ** 0.5 * plan.latent_pixels * plan.batch * plan.compute_bytes
        * (CHECKPOINTED if plan.gradient_checkpointing else 1),
    }
    parts["total"] = sum(parts.values())
    return parts


def alternatives(plan: Plan) -> dict[str, Plan]:
    """The options that shrink a run, each alone (flag -> the plan with it)."""
    out = {}
    if not plan.gradient_checkpointing:
        out["--gradient-checkpointing"] = replace(plan, gradient_checkpointing=True)
    if plan.ema:
        out["--ema-decay 0"] = replace(plan, ema=False)
    for smaller in ("xattn-kv", "xattn"):
        if smaller in plan.trainable and plan.trainable[smaller] < plan.trainable[plan.train_set]:
            out[f"--train {smaller}"] = replace(plan, train_set=smaller)
    if plan.batch > 1:
        out["--batch-size 1"] = replace(plan, batch=1)
    return out


def check_fits(plan: Plan, free_bytes: int, where: str) -> tuple[dict[str, float], str | None]:
    """(the estimate, a warning or None). The weights and the training state are exact arithmetic: when they alone exceed
    the free memory (with HEADROOM) the run cannot fit, and this raises one line naming what would. The activations are
    a rough estimate: when they tip it over, the same line comes back as a warning and the run goes on."""
    from erase.errors import EraseError

    need = estimate(plan)
    budget = free_bytes * HEADROOM
    if need["total"] <= budget:
        return need, None
    parts = ", ".join(f"{k} {size(v)}" for k, v in need.items() if k != "total" and v)
    options = alternatives(plan)
    fitting = [f"{flag} ({size(estimate(p)['total'])})" for flag, p in options.items() if estimate(p)["total"] <= budget]
    if not fitting and options:
        smallest = min((s for s in ("xattn-kv", "xattn", plan.train_set) if s in plan.trainable), key=plan.trainable.get)
        together = replace(plan, gradient_checkpointing=True, ema=False, batch=1, train_set=smallest)
        flags = [f for f in ("--gradient-checkpointing", "--ema-decay 0", f"--train {smallest}", "--batch-size 1") if f in options]
        if estimate(together)["total"] <= budget:
            fitting = [" ".join(flags) + f" together ({size(estimate(together)['total'])})"]
    hint = ("; these would fit: " + ", ".join(fitting)) if fitting else "; no option of erase makes it fit: use a GPU with more memory"
    message = f"this run needs about {size(need['total'])} on {where} ({parts}), {size(free_bytes)} free{hint}"
    if need["total"] - need["activations"] > budget:
        raise EraseError(message)
    return need, message + " (the activations are an estimate: going on)"


def size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 2**20:.1f} MiB"


def count_parameters(model, train_sets: tuple[str, ...]) -> tuple[int, dict[str, int]]:
    """(every UNet (or transformer) parameter, each train set's) from the config alone: a meta-device model, nothing read."""
    from erase.engine.params import is_transformer, selects

    unet = model.meta_unet()
    sizes, transformer = {n: p.numel() for n, p in unet.named_parameters()}, is_transformer(unet)
    return sum(sizes.values()), {s: sum(v for n, v in sizes.items() if selects(n, s, transformer)) for s in train_sets}


def text_parameters(model) -> int:
    """The text encoders' parameters, from the file's header."""
    prefixes = ("cond_stage_model.", "conditioner.", "text_encoder")
    return sum(t.numel for k, t in model.ckpt.tensors.items() if k.startswith(prefixes))


def free_memory(device) -> int | None:
    """Free bytes on a CUDA device; None elsewhere (the CPU's memory is the machine's, not checked here)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]
