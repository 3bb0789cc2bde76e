"""`erase run` (and `--jobs`): parse and validate the erasure's options, call erase.run, print the summary."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from erase.cli.app import Device, Precision, console, err_console
from erase.cli.common import ENGINE, FILES, PredictionType, TextEncodersOption, XformersOption
from erase.errors import EraseError


def _config_callback(ctx: typer.Context, param, value: Optional[Path]):
    """Eager --config: its values become the defaults of every other option, so flags still win."""
    if value is not None:
        from erase.config import load_toml

        allowed = {p.name for p in ctx.command.params if p.name not in ("config",)}
        try:
            ctx.default_map = {**(ctx.default_map or {}), **load_toml(value, allowed)}
        except EraseError as e:
            raise typer.BadParameter(str(e).split(": ", 1)[-1]) from None
    return value


class Method(str, Enum):
    sdd = "sdd"
    esd = "esd"
    ca = "ca"
    uce = "uce"


class TrainSet(str, Enum):
    xattn = "xattn"
    xattn_kv = "xattn-kv"
    text_kv = "text-kv"
    attn = "attn"
    noxattn = "noxattn"
    full = "full"


class PreserveSampling(str, Enum):  # erase.engine.preserve.SAMPLING, spelled out: importing it would load torch at start-up
    uniform = "uniform"
    loss = "loss"


ALGO = "Algorithm (SDD)"


METHOD_PANEL = "Method options (each method's own; [its default])"
TRAINING_OPTIONS = ("steps", "lr", "ema_decay", "seed", "train", "resolution", "precision", "gradient_checkpointing",
                    "xformers", "save_every", "resume", "preserve_per_step", "preserve_sampling", "preserve_paired", "preserve_project",
                    "batch_size", "scale_lr")  # --adversarial: erase.run says why
PRESERVE = "Preservation"
EMPTY = '""'  # the empty prompt, as the report prints it


def with_method_options(fn):
    """Add every method's own options to `fn`'s signature, from their declarations on the methods' configs: Typer
    reads the signature, so they become `--flag`s (help, choices and each owner's default in the help text), keys of
    jobs files and of --config, and arrive in `fn`'s **method_values (None when not given)."""
    import inspect
    import typing

    from erase.methods import METHODS
    from erase.methods.options import method_options

    sig = inspect.signature(fn, eval_str=True)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for opt in method_options(METHODS).values():
        owners = ", ".join(f"{m.upper()} {d!r}" if isinstance(d, str) else f"{m.upper()} {'none' if d is None else d}"
                           for m, d in opt.defaults.items())  # each owning method with its default
        option = typer.Option(opt.flag, help=f"{opt.help} [{owners}]", rich_help_panel=METHOD_PANEL, show_default=False)
        kind = Enum(opt.name, {c: c for c in opt.choices}, type=str) if opt.choices else opt.type  # Typer shows and checks choices
        params.append(inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=typing.Annotated[typing.Optional[kind], option]))
    fn.__signature__ = sig.replace(parameters=params)
    fn.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
    return fn


@with_method_options
def run(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Argument(help="Checkpoint: .safetensors / .ckpt single file, or a diffusers folder.",
                                                    show_default=False)] = None,
    concepts: Annotated[str, typer.Option("--concepts", "-c", help="Concepts to erase, comma-separated: \"nudity, violence\".", show_default=False)] = "",
    concepts_file: Annotated[Optional[Path], typer.Option("--concepts-file", help="More concepts to erase, one per line.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output path (default: <stem>-erased.safetensors beside the input).", rich_help_panel=FILES)] = None,
    method: Annotated[Method, typer.Option(help="sdd (the default), esd, ca (trained) or uce (closed form, seconds).", rich_help_panel=ALGO)] = Method.sdd,
    steps: Annotated[int, typer.Option(help="Optimizer steps (SDD reference 1500; ESD 1000).", rich_help_panel=ALGO)] = 1500,
    lr: Annotated[float, typer.Option(help="AdamW learning rate, constant (reference 1e-5).", rich_help_panel=ALGO)] = 1e-5,
    ema_decay: Annotated[float, typer.Option(help="EMA decay after every step; the EMA weights are written (SDD reference 0.999; ESD 0).",
                                             rich_help_panel=ALGO)] = 0.999,
    adversarial: Annotated[Optional[bool], typer.Option("--adversarial/--no-adversarial", help="SDD / ESD: adversarial training "
                                                        "(AdvUnlearn): each step a soft prompt prefix is trained to bring the concept back "
                                                        "on the current weights, and the loss is applied to it too (default: on for SDD with "
                                                        "preservation, off otherwise).", rich_help_panel=ALGO, show_default=False)] = None,
    adversarial_steps: Annotated[int, typer.Option(help="--adversarial: inner attack steps per step, warm-started (AdvUnlearn 30); 0: "
                                                   "none, the prefix steps once per step on the attacked term's own forward ('free' "
                                                   "adversarial training, 6 UNet evaluations per step).", rich_help_panel=ALGO)] = 0,
    adversarial_lr: Annotated[float, typer.Option(help="--adversarial: the prefix's learning rate (AdvUnlearn 1e-3 over 30 steps).",
                                                  rich_help_panel=ALGO)] = 1e-2,
    expand: Annotated[Optional[bool], typer.Option("--expand/--no-expand", help="Embed concepts in the vocabulary's prompt templates "
                                                   "(default: on; off with --preserve none).", rich_help_panel=PRESERVE, show_default=False)] = None,
    preserve: Annotated[str, typer.Option(help="Kept as they were: \"a, b\", auto[:N] (the N concepts nearest each target) or none (the "
                                          "reference algorithms); \"\" is kept unless none.", rich_help_panel=PRESERVE)] = "auto",
    preserve_file: Annotated[Optional[Path], typer.Option(help="More concepts to preserve, one per line.", rich_help_panel=PRESERVE)] = None,
    preserve_weight: Annotated[float, typer.Option(help="How strongly preserved concepts are held (SDD: the retain term's gamma; UCE: "
                                                   "the preserve scale, reference 1.0).", rich_help_panel=PRESERVE)] = 1.0,
    preserve_per_step: Annotated[Optional[int], typer.Option(help="Trained methods: preserved prompts in each step's retain term (each "
                                                             "adds about the method's own cost per step; default SDD 3, others 2).",
                                                             rich_help_panel=PRESERVE, show_default=False)] = None,
    preserve_sampling: Annotated[PreserveSampling, typer.Option(help="Trained methods: which preserved concept each retain slot holds: "
                                                                "uniform over the prompts, or loss (in proportion to each concept's "
                                                                "running retain loss).", rich_help_panel=PRESERVE)] = PreserveSampling.uniform,
    preserve_paired: Annotated[Optional[bool], typer.Option("--preserve-paired/--no-preserve-paired", help="Trained methods: also hold, on "
                                                            "each step's erasure latents, the erased prompt naming a preserved concept "
                                                            "instead ('a red circle' -> 'a red square'; the nearest most often). Default: on "
                                                            "for SDD.", rich_help_panel=PRESERVE, show_default=False)] = None,
    preserve_project: Annotated[bool, typer.Option("--preserve-project", help="Trained methods: remove from each step's erasure gradient "
                                                   "its component against the retain term's gradient when they conflict (AEGIS, PCGrad).",
                                                   rich_help_panel=PRESERVE)] = False,
    vocabulary: Annotated[Optional[str], typer.Option(help="Words for auto and templates: builtin:general, builtin:shapes or a TOML file.", rich_help_panel=PRESERVE)] = None,
    embedding: Annotated[Optional[list[Path]], typer.Option("--embedding", help="Textual-inversion file (e.g. from `erase feedback invert`) whose token "
                                                            "--concepts may name (repeatable).")] = None,
    train: Annotated[Optional[TrainSet], typer.Option("--train", help="Trainable set: xattn (all attn2), xattn-kv (attn2 k/v), noxattn (all but "
                                                      "attn2: ESD-u), full. Default: xattn-kv for SDD with preservation, else the "
                                                      "method's (xattn; CA: by --concept-type).", rich_help_panel=ALGO,
                                                      show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random draw (reference 42).", rich_help_panel=ALGO)] = 42,
    resolution: Annotated[Optional[int], typer.Option(help="Image size in pixels (default by family: 512 SD1, 768 SD2-v, 1024 SDXL).", rich_help_panel=ALGO)] = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when available. Every method encodes its prompts there (UCE too).",
                                           rich_help_panel=ENGINE)] = Device.auto,
    precision: Annotated[Precision, typer.Option(help="auto = bf16 autocast on GPUs with native bf16 (Ampere+), fp16 autocast with loss "
                                                 "scaling on older GPUs, fp32 on the CPU; trained weights stay fp32.", rich_help_panel=ENGINE)] = Precision.auto,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory in the UNet backward.", rich_help_panel=ENGINE)] = False,
    xformers: XformersOption = False,
    batch_size: Annotated[int, typer.Option(help="SDD / ESD: samples per optimizer step on each process, their teacher trajectories in one batch "
                                            "(reference 1). Under accelerate launch / torchrun each process adds its own.", rich_help_panel=ENGINE)] = 1,
    scale_lr: Annotated[bool, typer.Option("--scale-lr", help="Multiply --lr by the effective batch (batch size x processes).", rich_help_panel=ENGINE)] = False,
    prediction_type: PredictionType = None,
    text_encoders: TextEncodersOption = None,
    delta: Annotated[Optional[Path], typer.Option(help="Also write only the changed tensors (fp32 differences) here, for `erase merge`.", rich_help_panel=FILES)] = None,
    save_every: Annotated[int, typer.Option(help="Save a resumable state every N steps (0: only on Ctrl-C).", rich_help_panel=FILES)] = 0,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run from its state folder.", rich_help_panel=FILES)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with any of these options (flags win).", is_eager=True,
                                                   callback=_config_callback, rich_help_panel=FILES)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.", rich_help_panel=FILES)] = False,
    jobs: Annotated[Optional[Path], typer.Option("--jobs", help="Run the erasures listed in a TOML file instead of MODEL (see README: "
                                                 "jobs files); spread over ranks under torchrun / accelerate launch.",
                                                 rich_help_panel=FILES, show_default=False)] = None,
    job_digest: Annotated[Optional[str], typer.Option("--job-digest", hidden=True)] = None,  # set by --jobs: recorded in the output
    **method_values,  # every method's own options (erase.methods.options), added to the signature by `with_method_options`
) -> None:
    """Erase concepts from a checkpoint: SDD, ESD or CA fine-tune the UNet (cross-attention by default), UCE edits its keys and values in closed form.
    SD3 / SD3.5 and FLUX.1 single files and diffusers folders: SDD or ESD on the text stream (SDD's default adds the pooled
    text embedder), UCE on the text and pooled embedders (FLUX.1 files with --text-encoders).

    Writes <stem>-erased.safetensors: the input with only the changed tensors replaced, plus
    <stem>-erased.report.json. Example: erase run model.safetensors --concepts "nudity, violence"
    """
    from erase.engine.adversarial import AdversarialConfig
    from erase.engine.trainer import TrainConfig
    from erase.errors import UsageError
    from erase.methods import METHODS
    from erase.methods.base import ClosedFormMethod
    from erase.methods.options import method_options
    from erase.run import AUTO, RunOptions, erase_concepts, parse_concepts

    if jobs is not None:
        given_too = sorted(n for n in ctx.params if n != "jobs" and getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE")
        if model is not None or given_too:
            raise UsageError("--jobs takes every option from the jobs file: give no MODEL or other options with it"
                             f"{' (got ' + ', '.join(given_too) + ')' if given_too else ''}")
        _run_jobs(ctx.command, jobs)
        return
    if model is None:
        raise UsageError("missing MODEL: the checkpoint to erase from (or --jobs FILE)")
    # given on the command line or in --config (Typer vendors its own click: compare the source by name)
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "DEFAULT_MAP")}
    declared = method_options(METHODS)
    closed_form = issubclass(METHODS[method.value][0], ClosedFormMethod)
    for name in sorted(given):
        owner = declared.get(name)
        if (owner and method.value not in owner.defaults) or (name in TRAINING_OPTIONS and closed_form):
            flag = owner.flag.split("/")[0] if owner else "--" + name.replace("_", "-")  # a switch: its "--x" of "--x/--no-x"
            raise UsageError(f"{flag} does not apply to --method {method.value}")
    if adversarial is False and given & {"adversarial_steps", "adversarial_lr"}:
        raise UsageError("--adversarial-steps and --adversarial-lr set the inner attack of --adversarial: not with --no-adversarial")
    # only what was given: the rest is the method's own default (target and expand follow --preserve: erase.run)
    cfg_fields = set(METHODS[method.value][1].__dataclass_fields__)
    given_values = {**{k: v.value if isinstance(v, Enum) else v for k, v in method_values.items()}, "expand": expand,
                    "preserve_weight": preserve_weight}
    method_config = {k: v for k, v in given_values.items() if k in cfg_fields and k in given}
    method_defaults = {} if closed_form else METHODS[method.value][0].train_defaults(method_config)  # the authors' values
    steps, lr, ema_decay, train_set = (v if flag in given else method_defaults.get(k, v) for k, flag, v in
                                       (("steps", "steps", steps), ("lr", "lr", lr), ("ema_decay", "ema_decay", ema_decay), ("train_set", "train", None)))
    train_set = train.value if train is not None else train_set  # None: the method's default (erase.run.resolve_run_defaults)
    names = parse_concepts(concepts) if concepts.strip() or concepts_file is None else []
    if concepts_file is not None:  # one concept per line, as written: "a man, shirtless" stays one concept
        if not concepts_file.exists():
            raise UsageError(f"--concepts-file {concepts_file} does not exist")
        names = list(dict.fromkeys(names + [line.strip() for line in concepts_file.read_text().splitlines() if line.strip()]))
        if not names:
            raise UsageError(f"--concepts-file {concepts_file} names no concept")
    opts = RunOptions(
        model=model, concepts=names, out=out, method=method.value,
        train=TrainConfig(steps=steps, lr=lr, ema_decay=ema_decay, seed=seed, save_every=save_every, project_retain=preserve_project),
        method_config=method_config,
        resolution=resolution, train_set=train_set, device=device.value, precision=precision.value,
        gradient_checkpointing=gradient_checkpointing, xformers=xformers, delta=delta, resume=resume, force=force,
        prediction_type=prediction_type, text_encoders=text_encoders, preserve=preserve, preserve_file=preserve_file, vocabulary=vocabulary,
        preserve_weight=preserve_weight, preserve_per_step=preserve_per_step,
        preserve_sampling=preserve_sampling.value, preserve_paired=preserve_paired, embeddings=list(embedding or []), job_digest=job_digest,
        batch_size=batch_size, scale_lr=scale_lr,
        # given (or its options given): this attack; --no-adversarial: none; neither: the method's default (erase.run)
        adversarial=(AdversarialConfig(steps=adversarial_steps, lr=adversarial_lr) if adversarial or given & {"adversarial_steps", "adversarial_lr"}
                     else None if adversarial is False else AUTO),
    )
    ui = err_console if as_json else console
    report = erase_concepts(opts, ui)
    if report["output"] is None:  # a rank other than 0 under a launcher: rank 0 writes and reports
        if report.get("rank", 0):
            # Its work is done and its process group destroyed (erase.engine.distributed.leave). Leave without the
            # interpreter's teardown: once in the suite a gloo rank aborted there ("terminate called without an active
            # exception", exit -6) after finishing, and the launcher then failed the whole run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if "solve" in report:
        s = report["solve"]
        console.print(f"[bold green]wrote[/] {report['output']}  ({report['edited']['tensors']} tensors changed; "
                      f"{s['erase_prompts']} erase and {s['preserve_prompts']} preserved prompts, condition number "
                      f"{s['condition_number']:.3g}; {report['wall_seconds']:.0f}s)")
        moved = ", ".join(f"{c or EMPTY} {v:.3f}" for c, v in s.get("preserved_moved", {}).items())
        if moved:
            console.print(f"  preserved concepts moved (share of their k/v output): {moved}", highlight=False)
        if s.get("balance_rounds"):
            weights = ", ".join(f"{c or EMPTY} {w:.2g}" for c, w in s["balance_rounds"][-1]["weights"].items())
            console.print(f"  --balance {len(s['balance_rounds'])}: preserved weights {weights}", highlight=False)
        for r in s.get("robust_rounds", []):
            console.print(f"  RECE round {r['round']}: its embedding restored {r['restored_before']:.3f} of the concept's k/v, "
                          f"{r['restored_after']:.3f} after erasing it (plain prompts {r['plain_after']:.3f})", highlight=False)
    else:
        console.print(f"[bold green]wrote[/] {report['output']}  ({report['trainable']['tensors']} tensors changed, "
                      f"final loss {report['final_loss']:.4g}, {report['unet_evals_per_step']:.1f} UNet evals/step, "
                      f"{report['wall_seconds']:.0f}s)")
    console.print(f"[bold green]report[/] {report['report']}")
    if report["delta"]:
        console.print(f"[bold green]delta[/] {report['delta']}")


def _run_jobs(command, path: Path) -> None:
    """Each job runs through this same `run` command, its options given as the command's defaults (as --config gives them)."""
    from erase.jobs import launcher_rank, load_jobs, run_jobs

    job_list = load_jobs(path, {p.name for p in command.params})
    rank, world = launcher_rank()
    if world > 1:
        import torch

        from erase.engine.distributed import NO_DATA_PARALLEL

        os.environ[NO_DATA_PARALLEL] = "1"  # the ranks share out the jobs; each job runs on one process

        if torch.cuda.is_available():  # one device per rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())

    def invoke(job) -> int:
        # the job's options are the command's defaults, as --config's are: the command converts, checks and runs them
        # exactly as it does the same flags (no argv to rebuild from typed values)
        try:
            code = command.main(args=[], default_map={**job.options, "job_digest": job.digest}, prog_name="erase run",
                                standalone_mode=False)
        except Exception as e:  # click's usage errors (a bad value in the file): one line, like on the command line
            message = e.format_message() if hasattr(e, "format_message") else f"{type(e).__name__}: {e}"
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            return 2
        return code if isinstance(code, int) else 0

    rows = run_jobs(job_list, invoke, console, rank=rank, world=world)
    table = Table(title=f"jobs: {path}" + (f" (rank {rank} of {world})" if world > 1 else ""))
    for col in ("#", "job", "status", "output", "s"):
        table.add_column(col)
    style = {"ok": "green", "skipped": "dim", "failed": "bold red"}
    for r in rows:
        table.add_row(str(r["index"]), escape(r["job"]), f"[{style[r['status']]}]{r['status']}[/]", r["output"], f"{r['seconds']:.0f}")
    console.print(table)
    failed = [r["job"] for r in rows if r["status"] == "failed"]
    if failed:
        err_console.print(f"[bold red]error:[/] {len(failed)} of {len(rows)} jobs failed: {escape(', '.join(failed))}", highlight=False)
        raise typer.Exit(1)


