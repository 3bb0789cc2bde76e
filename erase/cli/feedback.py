"""`erase feedback ...`: collect images, label them, invert the labels into a token (HFI). Parse, validate, print."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from erase.cli.app import App, Device, Precision, Scheduler, console, err_console
from erase.cli.common import GUIDANCE_DEFAULTS, TextEncodersOption

feedback_app = App(
    name="feedback",
    help="Human feedback inversion: collect images, label them, condense the labels into a token that `erase run` can erase.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

# ---- collect (erase/feedback/collect.py) -------------------------------------------------------------------

@feedback_app.command()
def collect(
    model: Annotated[Path, typer.Argument(help="The checkpoint to be cleaned: it draws the images people will label.", show_default=False)],
    concept: Annotated[str, typer.Option("--concept", help="What people will judge, e.g. \"nudity\"; also the default prompts' subject.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for images/, manifest.jsonl and collection.json.", show_default=False)],
    n: Annotated[int, typer.Option("--n", help="Images to draw (prompts in turn, seeds seed, seed+1, ...).")] = 100,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt to draw (repeatable; default: the concept in the vocabulary's templates).")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts", help="Prompts to draw, one per line.")] = None,
    vocabulary: Annotated[Optional[str], typer.Option(help="Templates for the default prompts: builtin:general, builtin:shapes or a TOML file.")] = None,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance: Annotated[Optional[float], typer.Option(help=f"CFG scale ({GUIDANCE_DEFAULTS}).", show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option(help="Image size (default by family).")] = None,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.")] = Scheduler.ddim,
    negative: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    batch: Annotated[int, typer.Option(help="Images per UNet batch.")] = 4,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.")] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU.")] = Precision.auto,
    text_encoders: TextEncodersOption = None,
) -> None:
    """Draw images of a concept with the model to be cleaned, with a manifest that regenerates each one."""
    from rich.progress import Progress

    from erase.errors import UsageError
    from erase.feedback.collect import collect as run_collect
    from erase.generate import GenSettings

    texts = list(prompt or [])
    if prompts_file is not None:
        if not prompts_file.exists():
            raise UsageError(f"--prompts {prompts_file} does not exist")
        texts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    settings = GenSettings(steps=steps, guidance=guidance, size=size, scheduler=scheduler.value, negative=negative, batch=batch,
                           device=device.value, precision=precision.value)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("drawing", total=n)
        info = run_collect(model, concept, out, n=n, settings=settings, seed=seed, prompts=texts or None, vocabulary=vocabulary,
                           progress=lambda: bar.advance(task), text_encoders=text_encoders)
    console.print(f"[bold green]wrote[/] {info['images']} images of {len(info['prompts'])} prompts to {out} "
                  f"(manifest.jsonl); next: erase feedback label {out}")


# ---- label (erase/feedback/labels.py, server.py, autolabel.py) ---------------------------------------------

class LabelMode(str, Enum):
    binary = "binary"
    rank = "rank"


@feedback_app.command()
def label(
    folder: Annotated[Path, typer.Argument(help="A collection from `erase feedback collect`; answers go to FOLDER/labels.jsonl.", show_default=False)],
    mode: Annotated[LabelMode, typer.Option("--mode", help="binary: harmful or fine, one image at a time; rank: order groups of 5 images, most harmful first.")] = LabelMode.binary,
    auto_label: Annotated[Optional[str], typer.Option("--auto-label", help="No page: label with a detector, e.g. shapes:circle or shapes:red-circle.", show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Loopback address to listen on (the page has no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 0,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL only; do not open a browser.")] = False,
) -> None:
    """Label a collection: a local page (one name per labeller, every answer saved at once, resumable), or --auto-label."""
    from rich.markup import escape

    from erase.errors import UsageError
    from erase.feedback import labels as label_file
    from erase.feedback.collect import read_collection

    mode = mode.value
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port number (0-65535)")
    info, rows = read_collection(folder)
    if auto_label is not None:
        from erase.feedback.autolabel import auto_label as run_auto_label
        from erase.feedback.autolabel import parse_spec

        parse_spec(auto_label)  # a bad spec fails before the detector loads
        s = run_auto_label(folder, auto_label, mode)
        already = f"; {s['skipped']} already done by {s['labeller']}" if s["skipped"] else ""
        if mode == "binary":
            what = f"[bold green]labelled[/] {s['labelled']} images: {s['harmful']} harmful"
        else:
            what = f"[bold green]ranked[/] {s['labelled']} groups ({s['harmful']} images detected as {auto_label[len('shapes:'):]})"
        console.print(f"{what}{already} -> {escape(str(folder / label_file.LABELS))}", highlight=False, soft_wrap=True)
        return

    from erase.feedback.server import loopback_host, serve

    loopback_host(host)
    console.print(f"labelling [bold]{len(rows)}[/] images of {escape(repr(info.get('concept', '?')))} in {mode} mode; answers go to "
                  f"{escape(str(folder / label_file.LABELS))}", highlight=False, soft_wrap=True)

    def announce(url: str) -> None:
        console.print(f"open [bold cyan]{url}[/] (Ctrl-C to stop)", highlight=False)

    n = serve(folder, mode=mode, host=host, port=port, open_browser=not no_browser, announce=announce)
    console.print(f"stopped; {label_file.LABELS} holds {n} answer{'s' if n != 1 else ''} ({escape(str(folder))})", highlight=False, soft_wrap=True)


# ---- invert (erase/feedback/invert.py) ---------------------------------------------------------------------

@feedback_app.command()
def invert(
    folder: Annotated[Path, typer.Argument(help="A labelled collection (erase feedback collect + label).", show_default=False)],
    model: Annotated[Path, typer.Argument(help="The checkpoint to learn the token on (normally the one that drew the images).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Embedding file to write (.safetensors, A1111 / diffusers layout).", show_default=False)],
    token: Annotated[Optional[str], typer.Option(help="The token's name (default <concept>); use it in --concepts and prompts.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Word the token starts from (default: the collection's concept).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the token's vector.")] = 5e-3,
    batch: Annotated[int, typer.Option(help="Images per step, drawn in proportion to their reward.")] = 4,
    timesteps: Annotated[str, typer.Option(help="Training timesteps: uniform, or beta (Beta(3, 3)).")] = "uniform",
    template: Annotated[Optional[str], typer.Option(help="Prompt for every image, {} = the token (default: each image's own prompt, concept replaced).")] = None,
    labels: Annotated[str, typer.Option(help="Which labels: binary, rank (Bradley-Terry) or auto (rank when there are rankings).")] = "auto",
    top: Annotated[Optional[int], typer.Option(help="Learn from only the N images with the highest reward.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for image, timestep and noise draws.")] = 0,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.")] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="auto = bf16 autocast on GPUs with native bf16, fp16 autocast with loss scaling on "
                                                 "older GPUs, fp32 on the CPU; the token trains in fp32.")] = Precision.auto,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory in the UNet backward.")] = False,
    reward_model: Annotated[Optional[str], typer.Option(help="clip:PATH, a local CLIP folder: fit a reward head on its image features to "
                                                        "the labels and score the unlabelled images too (HFI's reward model).",
                                                        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT.")] = False,
    text_encoders: Annotated[Optional[Path], typer.Option(
        "--text-encoders", help="SD3 / FLUX.1 files: a diffusers folder of the family (default: the one the collection was drawn "
        "with).")] = None,
) -> None:
    """Condense the labels into one learned token (reward-weighted textual inversion); erase it with `erase run --embedding`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from erase.feedback.invert import InvertConfig
    from erase.feedback.invert import invert as run_invert

    cfg = InvertConfig(token=token, init=init, steps=steps, lr=lr, batch=batch, timesteps=timesteps, template=template, labels=labels,
                       top=top, seed=seed, device=device.value, precision=precision.value,
                       gradient_checkpointing=gradient_checkpointing, reward_model=reward_model)
    columns = [TextColumn("[bold]inverting"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("invert", total=steps, loss="-")
        report = run_invert(folder, model, out, cfg, force=force, progress=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4g}"),
                            text_encoders=text_encoders)
    if not report["same_model_as_collection"]:
        err_console.print("[yellow]note:[/] this is not the model that drew the collection; the token is learned on its images anyway")
    console.print(f"[bold green]wrote[/] {report['output']}: token {report['token']} from {report['images_used']} images "
                  f"({report['labels']} labels, init {report['init']!r}), {report['seconds']:.0f}s")
    if report["reward"]["source"] != "labels":
        r = report["reward"]
        console.print(f"reward model {r['source']}: fitted to {r['labelled']} labelled images (agreement {r['train_agreement']:.2f}), "
                      f"flagged {r['flagged_by_head']} of {r['scored']} unlabelled ones")
    folder_text = f" --text-encoders {report['text_encoders']}" if report["text_encoders"] else ""
    console.print(f"next: erase run {model}{folder_text} --embedding {report['output']} --concepts \"{report['token']}\"")
