"""The `erase` command line: parse, validate, call library code, print. No logic beyond that."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from erase import __version__
from erase.errors import EraseError

console = Console()
err_console = Console(stderr=True)


def _debug() -> bool:
    return os.environ.get("ERASE_DEBUG", "") not in ("", "0")


class _App(typer.Typer):
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
                    if _debug():
                        raise
                    err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
                    raise typer.Exit(e.exit_code) from None
                except KeyboardInterrupt:
                    err_console.print("[bold red]interrupted[/]")
                    raise typer.Exit(130) from None
                except Exception as e:  # a bug or an input we did not foresee: still one line
                    if _debug():
                        raise
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    err_console.print(f"[bold red]error:[/] {type(e).__name__}: {msg} (run with --debug for details)", highlight=False, soft_wrap=True)
                    raise typer.Exit(1) from None

            register(wrapper)
            return fn

        return decorator


app = _App(
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
) -> None:
    """Remove concepts from Stable Diffusion checkpoints."""
    if debug:
        os.environ["ERASE_DEBUG"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # erase never downloads anything


ModelPath = Annotated[Path, typer.Argument(help="Checkpoint: .safetensors / .ckpt single file, or a diffusers folder.", show_default=False)]
PredictionType = Annotated[Optional[str], typer.Option("--prediction-type", help="Override the detected prediction type: epsilon or v_prediction.")]


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command()
def inspect(
    model: ModelPath,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    with_hash: Annotated[bool, typer.Option("--hash", help="Also compute the file's sha256 (reads the whole file).")] = False,
    prediction_type: PredictionType = None,
) -> None:
    """Show a checkpoint's family, prediction type, dtypes, cross-attention size, EMA and erase provenance."""
    from erase.inspect import describe

    info = describe(model, with_hash=with_hash, prediction_type=prediction_type)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column()
    rows = [("file", info["path"]), ("format", info["format"]), ("size", _human_bytes(info["size_bytes"])),
            ("tensors", str(info["tensor_count"])), ("dtypes", ", ".join(f"{k} ({v})" for k, v in info["dtypes"].items()))]
    if info["kind"] == "checkpoint":
        rows += [
            ("family", info["family_label"]),
            ("prediction", f"{info['prediction_type']} ({info['prediction_source']})"),
            ("resolution", f"{info['default_resolution']} px (default)"),
            ("configs", info["config_source"]),
            ("UNet", f"{info['unet_parameters']:,} parameters"),
            ("attn2", f"{info['attn2_tensors']} tensors, {info['attn2_parameters']:,} parameters "
                      f"({100 * info['attn2_parameters'] / max(1, info['unet_parameters']):.1f}% of the UNet)"),
            ("EMA weights", "yes: " + info["ema_policy"] if info["ema"] else "no"),
        ]
    else:
        rows += [("kind", f"erase {info['kind']}"), ("parameters", f"{info['parameters']:,}")]
    for k, v in info.get("provenance", {}).items():
        rows.append((f"erase.{k}", v if isinstance(v, str) else json.dumps(v)[:200]))
    if "sha256" in info:
        rows.append(("sha256", info["sha256"]))
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


def entry() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(entry())
