"""`erase merge`: combine erasures, carry them onto fine-tunes, export a LoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from erase.cli.app import console


def merge(
    target: Annotated[Path, typer.Argument(help="The model to apply the erasures to: the base itself, or a fine-tune of it.", show_default=False)],
    sources: Annotated[list[Path], typer.Argument(help="Erased checkpoints (need --base) or delta files from `erase run --delta`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint (or LoRA file with --lora-rank).", show_default=False)],
    base: Annotated[Optional[Path], typer.Option(help="The model the SOURCES were erased from.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated weight per source (default 1 each).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="Write the combined delta as a kohya/A1111 LoRA of this rank instead.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT; merge even when recorded base hashes do not match.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Combine erasures: OUT = TARGET + sum(w_i * delta_i) on the changed tensors, everything else byte-identical."""
    from erase.errors import UsageError
    from erase.merge import merge as run_merge

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, not {weights!r}") from None
    result = run_merge(target, sources, out, base_path=base, weights=w, force=force, lora_rank=lora_rank)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if result.get("kind") == "lora":
        console.print(f"[bold green]wrote LoRA[/] {result['output']}: rank {result['rank']}, {result['layers']} layers, "
                      f"relative error mean {result['mean_relative_error']:.4f} max {result['max_relative_error']:.4f}; "
                      f"{result['skipped_tensors']} bias tensors ({result['skipped_parameters']:,} parameters) cannot be held by a LoRA")
        return
    if result["carried_onto_other_model"]:
        console.print("[yellow]note:[/] the target is not the model these erasures were made on; the deltas were carried over")
    console.print(f"[bold green]wrote[/] {result['output']}: {result['changed_tensors']} tensors changed, concepts "
                  f"{', '.join(result['concepts']) or '-'}")


