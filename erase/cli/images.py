"""`erase generate` and `erase evaluate`: images of a model (beside others), and what a detector finds in them."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from erase.cli.app import Device, Precision, Scheduler, console, err_console
from erase.cli.common import (
    ENGINE,
    GUIDANCE_DEFAULTS,
    PROMPTS,
    SAMPLING,
    ModelPath,
    PredictionType,
    Safety,
    TextEncodersOption,
    XformersOption,
    gen_settings,
    prompt_specs,
    warn_truncated,
)


def generate(
    model: ModelPath,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).", rich_help_panel=PROMPTS)] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompt file: text (one per line), CSV with a prompt column, or builtin:NAME.",
                                                   rich_help_panel=PROMPTS)] = None,
    negative: Annotated[str, typer.Option(help="Negative prompt.", rich_help_panel=PROMPTS)] = "",
    embedding: Annotated[Optional[list[Path]], typer.Option("--embedding", help="Textual-inversion file (A1111 / diffusers, e.g. from `erase feedback invert`) "
                                                            "whose token prompts may use (repeatable).", rich_help_panel=PROMPTS)] = None,
    n: Annotated[int, typer.Option("--n", help="Images per prompt (seeds seed, seed+1, ...).", rich_help_panel=SAMPLING)] = 1,
    seed: Annotated[int, typer.Option(help="First seed (a CSV's evaluation_seed/sd_seed column wins).", rich_help_panel=SAMPLING)] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.", rich_help_panel=SAMPLING)] = 25,
    guidance: Annotated[Optional[float], typer.Option(help=f"CFG scale (a CSV's guidance column wins; {GUIDANCE_DEFAULTS}). FLUX.1-dev: "
                                                      "the model's guidance input (one forward); a FLUX.1 without a guidance embedder "
                                                      "(schnell): 1 or less samples with one forward as FluxPipeline does.",
                                                      rich_help_panel=SAMPLING, show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option(help="Image size in pixels, multiple of 8 (default by family).", rich_help_panel=SAMPLING)] = None,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler (SD3 / FLUX.1: flow-matching Euler, for ddim or euler).", rich_help_panel=SAMPLING)] = Scheduler.ddim,
    batch: Annotated[int, typer.Option(help="Images per UNet batch.", rich_help_panel=SAMPLING)] = 4,
    safety: Annotated[Optional[Safety], typer.Option(help="SLD safety guidance preset (inference-time, no training).", rich_help_panel=SAMPLING)] = None,
    safety_concept: Annotated[Optional[str], typer.Option(help="Concept SLD steers away from (default: the SLD paper's list).", rich_help_panel=SAMPLING)] = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Another checkpoint, same prompts and seeds; writes grids (repeatable).")] = None,
    delta: Annotated[Optional[Path], typer.Option(help="Apply an erase delta file to MODEL in memory (MODEL is then the base).")] = None,
    text_encoders: TextEncodersOption = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.", rich_help_panel=ENGINE)] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU.", rich_help_panel=ENGINE)] = Precision.auto,
    xformers: XformersOption = False,
    prediction_type: PredictionType = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("erase-images"),
) -> None:
    """Generate reproducible images (PNG with A1111-style parameters), optionally side by side with other models."""
    from rich.progress import Progress

    from erase.generate import jobs_for, run_generate

    specs = prompt_specs(prompt, prompts)
    settings = gen_settings(steps, guidance, size, scheduler, negative, batch, device, precision, safety, safety_concept, embedding, xformers)
    settings.validate()
    models = [model, *(compare or [])]
    total = len(jobs_for(specs, settings, n=n, seed=seed)) * len(models)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("generating", total=total)
        summary = run_generate(models, specs, settings, out=out, n=n, seed=seed, delta=delta,
                               prediction_type=prediction_type, progress=lambda: bar.advance(task),
                               text_encoders=text_encoders)
    warn_truncated(summary["truncated_prompts"])
    for note in summary["notes"]:
        err_console.print(f"[yellow]note[/]: {note}")
    console.print(f"[bold green]wrote[/] {summary['images']} images to {summary['out']}"
                  + (f" and {len(summary['grids'])} grids (index.html)" if summary["grids"] else ""))


class DetectorName(str, Enum):
    nudenet = "nudenet"
    shapes = "shapes"


def evaluate(
    model: ModelPath,
    base: Annotated[Optional[Path], typer.Option(help="Base checkpoint: same prompts and seeds, for deltas and preservation.")] = None,
    prompts: Annotated[str, typer.Option(help="Prompt file (text or I2P-style CSV) or builtin:NAME (nudity, neutral, shapes).", rich_help_panel=PROMPTS)] = "builtin:nudity",
    category: Annotated[Optional[str], typer.Option(help="Keep only CSV prompts of this I2P category (e.g. sexual).", rich_help_panel=PROMPTS)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.", rich_help_panel=PROMPTS)] = None,
    embedding: Annotated[Optional[list[Path]], typer.Option("--embedding", help="Textual-inversion file (A1111 / diffusers, e.g. from `erase feedback invert`) "
                                                            "whose token prompts may use (repeatable).", rich_help_panel=PROMPTS)] = None,
    n: Annotated[int, typer.Option("--n", help="Images per prompt.", rich_help_panel=SAMPLING)] = 1,
    seed: Annotated[int, typer.Option(help="First seed (a CSV's seed column wins).", rich_help_panel=SAMPLING)] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.", rich_help_panel=SAMPLING)] = 25,
    guidance: Annotated[Optional[float], typer.Option(help=f"CFG scale (a CSV's guidance column wins; {GUIDANCE_DEFAULTS}). FLUX.1-dev: "
                                                      "the model's guidance input (one forward); a FLUX.1 without a guidance embedder "
                                                      "(schnell): 1 or less samples with one forward as FluxPipeline does.",
                                                      rich_help_panel=SAMPLING, show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option(help="Image size (default by family).", rich_help_panel=SAMPLING)] = None,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.", rich_help_panel=SAMPLING)] = Scheduler.ddim,
    batch: Annotated[int, typer.Option(help="Images per UNet batch.", rich_help_panel=SAMPLING)] = 4,
    detector: Annotated[DetectorName, typer.Option(help="What to detect: nudenet (NudeNet exposed classes) or shapes.")] = DetectorName.nudenet,
    threshold: Annotated[Optional[float], typer.Option(help="Detector score threshold (NudeNet default 0.6).")] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="shapes detector: the erased shape(s) (default: the model's erase.concepts).")] = None,
    fail_above: Annotated[Optional[float], typer.Option(help="Exit with code 3 when the flagged-image rate exceeds this (CI gate).")] = None,
    show_flagged: Annotated[bool, typer.Option("--show-flagged", help="Do not blur flagged images in report.html.")] = False,
    clip_model: Annotated[Optional[Path], typer.Option(help="Local CLIP folder for CLIP score (skipped otherwise).")] = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.", rich_help_panel=ENGINE)] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU.", rich_help_panel=ENGINE)] = Precision.auto,
    xformers: XformersOption = False,
    prediction_type: PredictionType = None,
    text_encoders: TextEncodersOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for images and report.json / report.html.")] = Path("erase-eval"),
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write report.json here.")] = None,
) -> None:
    """Measure a checkpoint: flagged-image rate (NudeNet or shapes), per-class counts, preservation vs --base, a gate for CI."""
    from rich.progress import Progress

    from erase.evaluate.runner import EvalOptions
    from erase.evaluate.runner import evaluate as run_evaluation
    from erase.generate import jobs_for

    if fail_above is not None and not 0 <= fail_above <= 1:
        from erase.errors import UsageError

        raise UsageError("--fail-above is a flagged-image rate between 0 and 1")
    settings = gen_settings(steps, guidance, size, scheduler, "", batch, device, precision, embeddings=embedding, xformers=xformers)
    opts = EvalOptions(model=model, prompts=prompts, out=out, base=base, settings=settings, n=n, seed=seed, limit=limit,
                       category=category, detector=detector.value, threshold=threshold, targets=target, fail_above=fail_above,
                       show_flagged=show_flagged, clip_model=clip_model, prediction_type=prediction_type, text_encoders=text_encoders)
    specs = prompt_specs(None, prompts, category, limit)
    total = len(jobs_for(specs, settings, n=n, seed=seed)) * (2 if base else 1)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("images", total=total)
        report = run_evaluation(opts, progress=lambda k: bar.advance(task, k))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    warn_truncated(report["truncated_prompts"])
    _print_evaluation(report, out)
    if report["gate"] and not report["gate"]["passed"]:
        err_console.print(f"[bold red]gate failed:[/] flagged rate {report['erased']['flagged_rate']:.3f} > {fail_above}")
        raise typer.Exit(report["gate"]["exit_code"])


def _print_evaluation(report: dict, out: Path) -> None:
    results = [(label, report[key]) for label, key in (("base", "base_results"), ("erased", "erased")) if report.get(key)]
    table = Table(title=f"{report['detector']} on {report['jobs']} images per model")
    for col in ("model", "flagged", "rate", "95% CI"):
        table.add_column(col)
    for label, r in results:
        table.add_row(label, f"{r['flagged']}/{r['images']}", f"{r['flagged_rate']:.3f}", "[{:.3f}, {:.3f}]".format(*r["flagged_rate_ci95"]))
    console.print(table)
    if "shape_accuracy" in results[-1][1]:  # shapes world: is each prompt's shape (and colour) drawn?
        shapes = Table(title="shape accuracy by prompt shape")
        shapes.add_column("prompt shape")
        for label, _ in results:
            shapes.add_column(label)
        for shape in results[-1][1]["shape_accuracy"]:
            shapes.add_row(shape, *(f"{r['shape_accuracy'].get(shape, 0):.3f}" for _, r in results))
        # None when no prompt names a colour
        shapes.add_row("colour fidelity", *("-" if r["colour_accuracy"] is None else f"{r['colour_accuracy']:.3f}" for _, r in results))
        console.print(shapes)
    pres = report["preservation"]
    if "ssim_mean" in pres:
        console.print(f"preservation vs base: SSIM {pres['ssim_mean']:.4f}, PSNR {pres['psnr_mean']:.2f} dB")
    console.print(f"[bold green]report[/] {out / 'report.json'}, {out / 'report.html'}")


