"""`erase inspect`: what a checkpoint is, before anything touches it."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from erase.cli.app import console
from erase.cli.common import ModelPath, PredictionType


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _names(names: list[str], show: int = 3) -> str:
    more = f", … (+{len(names) - show})" if len(names) > show else ""
    return f"{len(names)}: {', '.join(names[:show])}{more}"


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
    if info["kind"] == "checkpoint" and not info.get("supported", True):  # SD3 / SD3.5, FLUX.1: not every command yet
        share = 100 * info["text_stream_parameters"] / max(1, info["transformer_parameters"])
        blocks = f"{info['blocks']} joint" if info["family"] == "sd3" else f"{info['blocks']} double + {info['single_blocks']} single"
        rows += [
            ("family", f"{info['family_label']} ({info['layout']})"),
            ("transformer", f"{info['transformer_parameters']:,} parameters, width {info['width']}, {blocks} blocks"),
            ("text stream", f"{info['text_stream_tensors']} tensors, {info['text_stream_parameters']:,} parameters ({share:.1f}%); "
                            f"keys and values {info['text_kv_parameters']:,} "
                            + ("(add_k_proj, add_v_proj)" if info["format"] == "diffusers" else "(rows of the fused qkv)")),
            ("text encoders", ", ".join(info["text_encoders"]) or "none here"),
            ("VAE", "yes" if info["vae"] else "none here"),
            ("support", f"[yellow]{info['support']}[/]"),
        ]
    elif info["kind"] == "checkpoint":
        rows += [
            ("family", info["family_label"]),
            ("prediction", f"{info['prediction_type']} ({info['prediction_source']})"),
            ("resolution", f"{info['default_resolution']} px (default)"),
            ("configs", info["config_source"]),
            ("UNet", f"{info['unet_parameters']:,} parameters"),
            ("attn2", f"{info['attn2_tensors']} tensors, {info['attn2_parameters']:,} parameters "
                      f"({100 * info['attn2_parameters'] / max(1, info['unet_parameters']):.1f}% of the UNet)"),
            ("EMA weights", "yes: " + info["ema_policy"] if info["ema"] else "no"),
            ("extras", _names(info["extra_tensors"]) + " (not model weights: never loaded, kept byte-identical)"
             if info["extra_tensors"] else "none"),
        ]
        if info["unknown_tensors"]:
            rows.append(("unknown", f"[red]{_names(info['unknown_tensors'])}[/] (run, generate, evaluate and merge refuse this file)"))
    else:
        rows += [("kind", f"erase {info['kind']}"), ("parameters", f"{info['parameters']:,}")]
    for k, v in info.get("provenance", {}).items():
        rows.append((f"erase.{k}", v if isinstance(v, str) else json.dumps(v)[:200]))
    if "sha256" in info:
        rows.append(("sha256", info["sha256"]))
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


