"""`erase attack`: does the erased concept come back under UnlearnDiffAtk or CCE? Parse, validate, print."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from erase.cli.app import Device, Precision, Scheduler, console, err_console
from erase.cli.common import GUIDANCE_DEFAULTS, TextEncodersOption, XformersOption

PROMPTS, SAMPLING, ATTACK, ENGINE = "Prompts", "Sampling", "Attacks", "Engine"


class AttackName(str, Enum):
    unlearndiffatk = "unlearndiffatk"
    cce = "cce"
    all = "all"


class Protocol(str, Enum):
    sdd = "sdd"
    unlearndiffatk = "unlearndiffatk"


def attack(
    erased: Annotated[Path, typer.Argument(help="The erased checkpoint to attack.", show_default=False)],
    concept: Annotated[str, typer.Option("--concept", help="The erased concept: nudity, or a shape of the shapes world.", show_default=False)],
    base: Annotated[Optional[Path], typer.Option(help="The model before erasure: it draws UnlearnDiffAtk's target images and CCE's "
                                                 "images of the concept.")] = None,
    which: Annotated[AttackName, typer.Option("--attack", help="unlearndiffatk (adversarial prefix tokens), cce (a learned token) or all.",
                                              rich_help_panel=ATTACK)] = AttackName.all,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Cap on optimisation steps: per prompt for UnlearnDiffAtk, for the one "
                                                 "inversion of CCE (default 400 each).", rich_help_panel=ATTACK, show_default=False)] = None,
    tokens: Annotated[Optional[int], typer.Option(help="UnlearnDiffAtk: prefix tokens (default 5 for nudity, 3 otherwise).",
                                                  rich_help_panel=ATTACK, show_default=False)] = None,
    attack_lr: Annotated[float, typer.Option(help="UnlearnDiffAtk: Adam learning rate of the token distributions.", rich_help_panel=ATTACK)] = 0.01,
    weight_decay: Annotated[float, typer.Option(help="UnlearnDiffAtk: Adam weight decay.", rich_help_panel=ATTACK)] = 0.1,
    eval_every: Annotated[int, typer.Option(help="UnlearnDiffAtk: steps between drawing the argmax prompt (stops at the first flagged image).",
                                            rich_help_panel=ATTACK)] = 40,
    t_start: Annotated[int, typer.Option(help="UnlearnDiffAtk: first training timestep of the cycle.", rich_help_panel=ATTACK)] = 10,
    t_stride: Annotated[int, typer.Option(help="UnlearnDiffAtk: timestep stride of the cycle (10, 30, ..., 990).", rich_help_panel=ATTACK)] = 20,
    target_images: Annotated[Optional[Path], typer.Option(help="UnlearnDiffAtk: target images, one per case in file-name order "
                                                          "(instead of BASE's).", rich_help_panel=ATTACK)] = None,
    images: Annotated[int, typer.Option(help="CCE: images of the concept BASE draws to learn the token from.", rich_help_panel=ATTACK)] = 25,
    concept_images: Annotated[Optional[Path], typer.Option(help="CCE: your own images of the concept (instead of BASE's).",
                                                           rich_help_panel=ATTACK)] = None,
    cce_lr: Annotated[float, typer.Option(help="CCE: learning rate of the token.", rich_help_panel=ATTACK)] = 5e-3,
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file (text, or the attack suites' CSV: prompt, evaluation_seed, "
                                                   "evaluation_guidance, categories) or builtin:NAME (default: builtin:nudity, or "
                                                   "builtin:shapes' rows of the shape).", rich_help_panel=PROMPTS, show_default=False)] = None,
    category: Annotated[Optional[str], typer.Option(help="Keep only CSV prompts of this category.", rich_help_panel=PROMPTS)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.", rich_help_panel=PROMPTS)] = None,
    vocabulary: Annotated[Optional[str], typer.Option(help="CCE: templates of the concept's images (builtin:general, builtin:shapes, a TOML).",
                                                      rich_help_panel=PROMPTS)] = None,
    n: Annotated[int, typer.Option("--n", help="Seeds per prompt; each (prompt, seed) is one attacked case.", rich_help_panel=SAMPLING)] = 1,
    seed: Annotated[int, typer.Option(help="First seed (a CSV's evaluation_seed column wins).", rich_help_panel=SAMPLING)] = 0,
    sample_steps: Annotated[int, typer.Option(help="Denoising steps of every image.", rich_help_panel=SAMPLING)] = 25,
    guidance: Annotated[Optional[float], typer.Option(help=f"CFG scale (a CSV's evaluation_guidance column wins; {GUIDANCE_DEFAULTS}).",
                                                      rich_help_panel=SAMPLING, show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option(help="Image size (default by family).", rich_help_panel=SAMPLING)] = None,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.", rich_help_panel=SAMPLING)] = Scheduler.ddim,
    batch: Annotated[int, typer.Option(help="Images per UNet batch.", rich_help_panel=SAMPLING)] = 4,
    detector: Annotated[Optional[str], typer.Option(help="nudenet or shapes (default: from the concept).", show_default=False)] = None,
    protocol: Annotated[Protocol, typer.Option(help="NudeNet: sdd (6 exposed classes at 0.6, erase evaluate's) or unlearndiffatk "
                                               "(9 exposed classes with feet, belly and armpits, at 0.45).")] = Protocol.sdd,
    target: Annotated[Optional[list[str]], typer.Option("--target", help="shapes detector: the shape(s) that count (default: the concept).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Detector score threshold (default: the protocol's).", show_default=False)] = None,
    fail_above: Annotated[Optional[float], typer.Option(help="Exit with code 3 when any attack's success rate exceeds this (CI gate).")] = None,
    show_flagged: Annotated[bool, typer.Option("--show-flagged", help="Do not blur flagged images in report.html.")] = False,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available.", rich_help_panel=ENGINE)] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on the CPU.",
                                                 rich_help_panel=ENGINE)] = Precision.auto,
    xformers: XformersOption = False,
    text_encoders: TextEncodersOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for images, state and report.json / report.html.")] = Path("erase-attack"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted attack in OUT (same options).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an OUT that holds an attack.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write report.json here.")] = None,
) -> None:
    """Attack an erased checkpoint: per prompt, does the concept come back? Attack success rates with 95% CIs, a CI gate."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from erase.attack.cce import CCEConfig
    from erase.attack.runner import ATTACKS, AttackOptions, run_attack
    from erase.attack.unlearndiffatk import UnlearnDiffAtkConfig
    from erase.generate import GenSettings

    settings = GenSettings(steps=sample_steps, guidance=guidance, size=size, scheduler=scheduler.value, batch=batch, device=device.value,
                           precision=precision.value, xformers=xformers)
    uda = UnlearnDiffAtkConfig(tokens=tokens, lr=attack_lr, weight_decay=weight_decay, eval_every=eval_every, t_start=t_start,
                               t_stride=t_stride, **({"steps": steps} if steps is not None else {}))
    cce = CCEConfig(images=images, lr=cce_lr, seed=seed, **({"steps": steps} if steps is not None else {}))
    opts = AttackOptions(erased=erased, concept=concept, out=out, base=base, prompts=prompts, category=category, limit=limit, n=n, seed=seed,
                         attacks=ATTACKS if which is AttackName.all else (which.value,), settings=settings, detector=detector,
                         protocol=protocol.value, targets=target, threshold=threshold, uda=uda, cce=cce, target_images=target_images,
                         concept_images=concept_images, vocabulary=vocabulary, text_encoders=text_encoders, fail_above=fail_above,
                         show_flagged=show_flagged,
                         resume=resume, force=force)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        report = run_attack(opts, progress=progress)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    _print_report(report, out)
    gate = report["gate"]
    if gate and not gate["passed"]:
        err_console.print(f"[bold red]gate failed:[/] attack success rate {gate['worst_asr']:.3f} > {gate['fail_above']}")
        raise typer.Exit(gate["exit_code"])


def _print_report(report: dict, out: Path) -> None:
    from erase.attack.report import NAMES

    n = report["cases_total"]
    table = Table(title=f"{report['concept']!r} on {n} prompts x seeds ({report['detector']['name']})")
    for col in ("", "successes", "rate", "95% CI", "UNet evals / prompt"):
        table.add_column(col)
    pre = report["pre_attack"]
    table.add_row("before attack", f"{pre['successes']}/{n}", f"{pre['rate']:.3f}", "[{:.3f}, {:.3f}]".format(*pre["ci95"]), "-")
    for name, r in report["results"].items():
        evals = f"{r['unet_evals_per_prompt']:.0f}" if "unet_evals_per_prompt" in r else "-"
        table.add_row(f"ASR {NAMES.get(name, name)}", f"{r['successes']}/{n}", f"{r['asr']:.3f}", "[{:.3f}, {:.3f}]".format(*r["asr_ci95"]), evals)
    console.print(table)
    console.print(f"[bold green]report[/] {out / 'report.json'}, {out / 'report.html'}")
