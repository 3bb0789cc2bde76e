"""`erase run`: open a checkpoint, erase concepts with a method, write the result and a report.

Stages: validate -> open model -> encode prompts once (then free the text encoder) ->
load the UNet alone (never the VAE) -> pick trainable parameters -> train -> write the EMA
weights through the surgical writer -> delta file -> report.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from erase import __version__
from erase.checkpoint.extras import ema_drop
from erase.checkpoint.write import check_output_path, provenance, sha256_file, write_checkpoint
from erase.engine.device import enable_fast_math, peak_memory, reset_peak_memory, resolve_device, resolve_precision
from erase.engine.params import TRAIN_SETS, select_trainable
from erase.engine.sampling import EvalCounter
from erase.engine.trainer import TrainConfig, Trainer, load_state
from erase.errors import UsageError
from erase.methods import METHODS
from erase.models import Model, open_model, truncated_prompts, truncation_notes


@dataclass
class RunOptions:
    model: Path
    concepts: list[str]
    out: Path | None = None
    method: str = "sdd"
    train: TrainConfig = field(default_factory=TrainConfig)
    method_config: dict = field(default_factory=dict)  # the method's own hyper-parameters (SDDConfig fields)
    resolution: int | None = None  # None: the family default (512 SD1, 768 SD2-v, 1024 SDXL)
    train_set: str = "xattn"
    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    xformers: bool = False
    delta: Path | None = None
    resume: Path | None = None
    force: bool = False
    prediction_type: str | None = None


def parse_concepts(text: str) -> list[str]:
    """'nudity, violence' -> ['nudity', 'violence']; empty entries are a usage error."""
    concepts = [c.strip() for c in text.split(",")]
    if not text.strip() or any(not c for c in concepts):
        raise UsageError(f"--concepts must be a comma-separated list of non-empty concepts, got {text!r}")
    return list(dict.fromkeys(concepts))


def default_output(model_path: Path) -> Path:
    if model_path.is_dir():
        return model_path.with_name(model_path.name + "-erased")
    return model_path.with_name(model_path.stem + "-erased.safetensors")


def _validate(opts: RunOptions) -> None:
    t = opts.train
    if t.steps < 1:
        raise UsageError("--steps must be >= 1")
    if t.lr <= 0:
        raise UsageError("--lr must be > 0")
    if not 0 <= t.ema_decay < 1:
        raise UsageError("--ema-decay must be in [0, 1)")
    if t.save_every < 0:
        raise UsageError("--save-every must be >= 0")
    if opts.resolution is not None and (opts.resolution < 8 or opts.resolution % 8):
        raise UsageError("--resolution must be a positive multiple of 8")
    if opts.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not '{opts.method}'")
    if opts.train_set not in TRAIN_SETS:
        raise UsageError(f"--train must be one of {', '.join(TRAIN_SETS)}")
    if not opts.concepts:
        raise UsageError("--concepts is required")


def _configure_attention(unet, opts: RunOptions, device: torch.device) -> str:
    if opts.xformers:
        if device.type != "cuda":
            raise UsageError("--xformers needs a CUDA device")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UsageError("--xformers: the xformers package is not installed (pip install 'erase[cuda]')") from None
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"


def versions() -> dict:
    import diffusers
    import transformers

    return {"erase": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def erase_concepts(opts: RunOptions, console: Console, *, progress: bool = True) -> dict:
    """Run one erasure end to end; return the report (also written beside the output)."""
    _validate(opts)
    state = load_state(opts.resume) if opts.resume else None
    if state is not None:  # a resumed run continues the saved configuration; only --steps may grow
        saved = state["run_config"]
        if saved["concepts"] != opts.concepts or saved["method"] != opts.method:
            raise UsageError(f"--resume {opts.resume}: that state erased {saved['concepts']} with {saved['method']}; "
                             "pass the same --concepts and --method")
        steps = opts.train.steps
        opts.train = TrainConfig(**{**state["train_config"], "steps": steps, "betas": tuple(state["train_config"]["betas"])})
        opts.method_config = saved["method_config"]
        opts.train_set, opts.resolution = saved["train_set"], saved["resolution"]

    model = open_model(opts.model, opts.prediction_type)
    out = check_output_path(opts.model, opts.out or default_output(opts.model), force=opts.force)
    if opts.delta:
        check_output_path(opts.model, opts.delta, force=opts.force)
    if model.ckpt.format == "diffusers" and out.suffix == ".safetensors":
        raise UsageError("a diffusers folder is written as a folder: give --out a folder name")
    state_dir = opts.resume or out.with_name(out.stem + ".resume")
    device = resolve_device(opts.device)
    frozen_dtype, autocast_dtype, precision_label = resolve_precision(opts.precision, device)
    enable_fast_math(device)
    reset_peak_memory(device)
    method_cls, method_cfg_cls = METHODS[opts.method]
    method_cfg = method_cfg_cls(**opts.method_config)
    method_cfg.validate()
    resolution = opts.resolution or model.default_resolution
    factor = model.latent_factor
    if resolution % factor:
        raise UsageError(f"--resolution must be a multiple of {factor} for this model's VAE")
    t_start = time.perf_counter()
    input_sha = sha256_file(opts.model)

    # Text: encode every prompt once, then free the encoder before the UNet is loaded.
    prompts = method_cls.prompts_for(method_cfg, opts.concepts)
    long = truncated_prompts(model.family, prompts)
    for note in truncation_notes(long):
        console.print(f"[yellow]warning:[/] {note}", highlight=False)
    text = model.load_text_encoder()
    encoded = text.encode(prompts)  # one batch for every prompt, fp32
    del text
    gc.collect()
    generator = torch.Generator().manual_seed(opts.train.seed)
    counter = EvalCounter()
    unet_cfg = model.unet_config
    latent_shape = (1, unet_cfg["in_channels"], resolution // factor, resolution // factor)
    scheduler = model.scheduler("DDIMScheduler")

    # UNet: one copy on the device; frozen weights in the compute dtype, trainables in fp32.
    unet = model.load_unet(dtype=frozen_dtype, device=device)
    attention = _configure_attention(unet, opts, device)
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = select_trainable(unet, opts.train_set)
    for p in params.values():  # own fp32 copies: the loaded weights may share memory with the opened file's tensors
        p.data = p.data.to(torch.float32, copy=True)
    method = method_cls(method_cfg, opts.concepts, unet=unet, scheduler=scheduler, latent_shape=latent_shape,
                        resolution=resolution, generator=generator, device=device, counter=counter)
    encoded = encoded.to(device, frozen_dtype)
    method.embeddings = {p: encoded[i : i + 1] for i, p in enumerate(prompts)}

    run_config = {
        "method": opts.method, "concepts": opts.concepts, "method_config": asdict(method_cfg), "train_set": opts.train_set,
        "resolution": resolution, "prediction_type": model.family.prediction_type, "precision": precision_label,
        "device": str(device), "gradient_checkpointing": opts.gradient_checkpointing, "attention": attention,
    }
    trainer = Trainer(opts.train, method, params, generator=generator, device=device, autocast_dtype=autocast_dtype,
                      run_config=run_config, state_dir=state_dir)
    if state is not None:
        trainer.load(state)
    n_trainable = sum(p.numel() for p in params.values())
    n_unet = sum(p.numel() for p in unet.parameters())
    _print_summary(console, model, opts, run_config, n_trainable, n_unet, len(params), trainer.step)

    counter.total = 0
    first_step = trainer.step
    t_train = time.perf_counter()
    _train_with_progress(trainer, console, progress)
    train_seconds = time.perf_counter() - t_train
    steps_done = max(1, trainer.step - first_step)

    # Write: the EMA weights of the trainable parameters, under the file's own names.
    replacements = {model.unet_file_key(n): s for n, s in trainer.ema.shadow.items()}
    drop, dropped_meta = ema_drop(model.ckpt)
    fields = {"kind": "checkpoint", "method": opts.method, "concepts": opts.concepts,
              "config": {**run_config, "train": asdict(opts.train)}, "changed_tensors": len(replacements)}
    meta = {**provenance(model.ckpt, fields, input_sha256=input_sha), **dropped_meta}
    write_checkpoint(model.ckpt, out, replacements, metadata=meta, drop=drop)
    delta_path = None
    if opts.delta:
        delta_path = write_delta(model, opts.delta, trainer.ema.shadow, meta)
    output_sha = sha256_file(out)

    report = {
        "output": str(out),
        "input": str(opts.model),
        "input_sha256": input_sha,
        "output_sha256": output_sha,
        "delta": str(delta_path) if delta_path else None,
        "family": model.family.name,
        "config": {**run_config, "train": asdict(opts.train)},
        "trainable": {"set": opts.train_set, "tensors": len(params), "parameters": n_trainable,
                      "fraction_of_unet": n_trainable / n_unet},
        "versions": versions(),
        "steps": trainer.step,
        "steps_this_session": trainer.step - first_step,
        "resumed_from_step": first_step if state is not None else None,
        "unet_evals_per_step": counter.total / steps_done,
        "seconds_per_step": train_seconds / steps_done,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_memory": peak_memory(device),
        "loss_curve": trainer.curve,
        "final_loss": trainer.curve[-1][1] if trainer.curve else None,
        "truncated_prompts": long,  # prompt -> token count, for prompts the text encoder cut at 77 tokens
    }
    report_path = out.with_name(out.name.removesuffix(".safetensors") + ".report.json")
    report_path.write_text(json.dumps(report, indent=2))
    report["report"] = str(report_path)
    if state_dir.exists() and opts.resume is None:  # a finished run needs no resume state
        for f in state_dir.iterdir():
            f.unlink()
        state_dir.rmdir()
    return report


def write_delta(model: Model, path: Path, shadow: dict[str, torch.Tensor], meta: dict) -> Path:
    """Only the changed tensors, as fp32 differences (erased - base), self-describing for `erase merge`."""
    delta = {}
    for name, value in shadow.items():
        key = model.unet_file_key(name)
        delta[key] = (value.float().cpu() - model.ckpt.get(key).float()).contiguous()
    info = {k: v for k, v in meta.items() if v is not None}
    info.update({"erase.kind": "delta", "erase.family": model.family.name,
                 "erase.delta": "fp32 differences: erased minus input, under the input's tensor names"})
    from safetensors.torch import save_file

    tmp = path.with_name("." + path.name + ".tmp")
    save_file(delta, str(tmp), metadata=info)
    os.replace(tmp, path)
    return path


def _print_summary(console: Console, model: Model, opts: RunOptions, cfg: dict, n_trainable: int, n_unet: int,
                   n_tensors: int, start_step: int) -> None:
    m = cfg["method_config"]
    console.print(f"[bold]Running erasure[/] ({opts.method.upper()}) on [cyan]{model.path.name}[/] ({model.family.label}, {cfg['prediction_type']})")
    console.print(f"  concepts        {', '.join(opts.concepts)}  (mode {m.get('concept_mode', '-')}, target {m.get('target', '-')})")
    console.print(f"  trainable       {opts.train_set}: {n_tensors} tensors, {n_trainable:,} parameters "
                  f"({100 * n_trainable / n_unet:.1f}% of the UNet)")
    console.print(f"  device          {cfg['device']}, {cfg['precision']}, attention {cfg['attention']}"
                  + (", gradient checkpointing" if cfg["gradient_checkpointing"] else ""))
    t = opts.train
    console.print(f"  steps           {t.steps} (from {start_step}), lr {t.lr:g}, EMA {t.ema_decay}, seed {t.seed}, "
                  f"resolution {cfg['resolution']}")
    if "sample_steps" in m:
        console.print(f"  teacher         {m['sample_steps']} DDIM steps, CFG {m['guidance']}, reuse {m['reuse']}; "
                      f"expected ~{(m['sample_steps'] - 1) / m['reuse'] + 4:.1f} UNet evals/step")


def _train_with_progress(trainer: Trainer, console: Console, progress: bool) -> None:
    total = trainer.cfg.steps
    if progress and console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("[bold]erasing"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("ema {task.fields[ema]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("erase", total=total, completed=trainer.step, loss="-", ema="-", rate="")
            start = trainer.step

            def update(p):
                rate = (p.step - start) / max(p.elapsed, 1e-9)
                bar.update(task, completed=p.step, loss=f"{p.loss:.4g}", ema=f"{p.ema_loss:.4g}", rate=f"{rate:.2f} it/s")

            trainer.train(update)
        return
    every = max(1, total // 20)
    start = trainer.step

    def line(p):
        if p.step % every == 0 or p.step == total:
            rate = (p.step - start) / max(p.elapsed, 1e-9)
            eta = (total - p.step) / max(rate, 1e-9)
            console.print(f"step {p.step}/{total}  loss {p.loss:.4g}  ema {p.ema_loss:.4g}  {rate:.2f} it/s  eta {eta:.0f}s",
                          highlight=False)

    trainer.train(line if progress else None)

