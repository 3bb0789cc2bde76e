"""The Typer app class every `erase` command group uses: errors become one line and an exit code."""

from __future__ import annotations

import functools
import os
from enum import Enum

import typer
from rich.console import Console
from rich.markup import escape

from erase.errors import EraseError

console = Console()
err_console = Console(stderr=True)


def debug_enabled() -> bool:
    return os.environ.get("ERASE_DEBUG", "") not in ("", "0")


class App(typer.Typer):
    """A Typer app whose commands turn `EraseError` into one red line and an exit code.

    This wrapper is the one place where errors become exit codes: 1 for a failure,
    2 for a usage error; unexpected exceptions also end in one line (with --debug or
    ERASE_DEBUG=1 the traceback is shown instead).
    """

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(fn):
            @functools.wraps(fn)
            def wrapper(*a, **kw):
                try:
                    return fn(*a, **kw)
                except (typer.Exit, typer.Abort):
                    raise
                except EraseError as e:
                    if debug_enabled():
                        raise
                    err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
                    raise typer.Exit(e.exit_code) from None
                except KeyboardInterrupt:
                    err_console.print("[bold red]interrupted[/]")
                    raise typer.Exit(130) from None
                except Exception as e:  # a bug or an input we did not foresee: still one line
                    if debug_enabled():
                        raise
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    err_console.print(f"[bold red]error:[/] {type(e).__name__}: {escape(msg)} (run with --debug for details)", highlight=False, soft_wrap=True)
                    raise typer.Exit(1) from None

            register(wrapper)
            return fn

        return decorator


# Choices several command groups share.
class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Scheduler(str, Enum):
    ddim = "ddim"
    dpm = "dpm"
    euler = "euler"
    euler_a = "euler-a"
    pndm = "pndm"
    unipc = "unipc"
