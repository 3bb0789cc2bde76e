"""The `erase` command line: parse, validate, call library code, print. No logic beyond that.

One module per command (group): inspect, run, images (generate, evaluate), merge, attack, feedback; this one holds
the app, its global options and the registration."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from erase import __version__
from erase.cli.app import App, console

app = App(
    name="erase",
    help="Remove concepts from Stable Diffusion checkpoints (SDD fine-tuning of UNet cross-attention).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"erase {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors (or set ERASE_DEBUG=1).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: OMP_NUM_THREADS, else the cores this "
                                                   "process may use that are free at start-up, shared among a launcher's ranks).",
                                                   show_default=False)] = None,
) -> None:
    """Remove concepts from Stable Diffusion checkpoints."""
    if debug:
        os.environ["ERASE_DEBUG"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # erase never downloads anything
    from erase.engine.threads import configure_threads

    if threads is not None and threads < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--threads")
    configure_threads(threads)  # before any command starts work: threads for the cores this process has free



def _register() -> None:
    from erase.cli.attack import attack
    from erase.cli.feedback import feedback_app
    from erase.cli.images import evaluate, generate
    from erase.cli.inspect import inspect
    from erase.cli.merge import merge
    from erase.cli.run import run

    for command in (inspect, run, generate, evaluate, merge, attack):
        app.command()(command)
    app.add_typer(feedback_app, name="feedback")


_register()


def entry() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(entry())
