"""`erase merge`: combine erasures (task arithmetic), carry them onto fine-tunes, export a LoRA.

    OUT = TARGET + sum_i w_i * delta_i      (fp32, cast to TARGET's dtype, surgical writer)

A source is an erase delta file (`erase run --delta`: fp32 differences, self-describing) or an
erased checkpoint (delta = SOURCE - BASE on the tensors that differ; BASE must be the model it
was erased from, checked against the sha256 recorded in its `erase.*` metadata).
Deltas are keyed by diffusers UNet parameter names internally, so a delta made on a single
file applies to a diffusers folder of the same model and the other way round. SD3 / FLUX.1 files and folders are merged
under their own tensor names (a trained text-stream key or value is rows of a fused qkv tensor, and so is its delta); a
delta taken in another layout of the same model (a release file, with or without ComfyUI's prefix, or a diffusers folder)
is carried over through diffusers' parameter names, and their LoRA is written in diffusers' layout (erase.lora).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from erase.checkpoint.extras import ema_drop
from erase.checkpoint.families import LDM_UNET
from erase.checkpoint.formats import Checkpoint, open_checkpoint
from erase.checkpoint.keymap import diffusers_to_ldm
from erase.checkpoint.write import check_output_path, provenance, sha256_file, write_checkpoint
from erase.errors import EraseError, UsageError
from erase.models import Model, open_model


@dataclass
class Delta:
    path: Path
    tensors: dict[str, torch.Tensor]  # diffusers UNet parameter name -> fp32 difference
    base_sha256: str | None
    family: str
    concepts: list[str]
    weight: float = 1.0


@dataclass
class Target:
    """A checkpoint merge reads or writes: its tensors, its family, and how a delta's names map to its keys."""

    ckpt: Checkpoint
    family: str
    label: str
    names: dict[str, str]  # every key a delta may use -> the internal name
    key: object  # internal name -> the checkpoint's key
    model: Model | None = None  # Stable Diffusion files (the LoRA export reads its config)
    transformer: object = None  # SD3 / FLUX.1: the file's TransformerFile (the LoRA export maps fused rows to parameters)


def open_target(path: Path) -> Target:
    """A Stable Diffusion checkpoint (deltas by diffusers UNet names), or an SD3 / FLUX.1 single file or folder (by its own
    tensors' names: a delta applies to the layout it was taken in)."""
    from erase.checkpoint.transformer_files import read_transformer_file

    if (tf := read_transformer_file(ckpt := open_checkpoint(path))) is not None:
        return Target(ckpt, tf.family, tf.label, {k: k for k in tf.transformer}, lambda n: n, transformer=tf)
    model = open_model(path)
    return Target(model.ckpt, model.family.name, model.family.label, _name_map(model), model.unet_file_key, model)


def parameter_deltas(target: Target, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3 / FLUX.1 delta under file names (fused qkv rows) as the transformer's parameters (diffusers names) that it
    changes: each assembled from its rows (erase.checkpoint.transformer_keymap), the unchanged ones (a fused tensor's
    query rows) left out."""
    from erase.checkpoint.transformer_config import file_pieces
    from erase.checkpoint.transformer_keymap import assemble

    pieces = file_pieces(target.ckpt, target.transformer)
    names = {p.name for p in pieces if p.file in delta}
    zeros = lambda n: torch.zeros(target.ckpt.shape(n))  # noqa: E731
    params = assemble([p for p in pieces if p.name in names], lambda files: {f: delta[f] if f in delta else zeros(f) for f in files})
    return {n: d for n, d in params.items() if d.abs().max() > 0}


def in_target_layout(target: Target, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3 / FLUX.1 delta taken in another layout of the same model (a release file's fused rows with or without
    ComfyUI's prefix, or a diffusers folder's parameters) as deltas of the target's own tensors: through diffusers'
    parameter names, each row written where the target keeps it (zero elsewhere: a fused tensor's untouched rows)."""
    from erase.checkpoint.transformer_config import file_pieces
    from erase.checkpoint.transformer_files import FOLDER_PREFIX, PREFIX
    from erase.checkpoint.transformer_keymap import Piece, assemble, splice, transformer_pieces

    tf = target.transformer
    if all(k.startswith(FOLDER_PREFIX) for k in tensors):
        pieces = [Piece(k, None, k[len(FOLDER_PREFIX):]) for k in tensors]
    else:
        prefix = PREFIX if all(k.startswith(PREFIX) for k in tensors) else ""
        pieces = transformer_pieces(tf.family, {k: tuple(v.shape) for k, v in tensors.items()}, prefix, tf.width)
    params = assemble(pieces, lambda files: {f: tensors[f] for f in files})
    return splice(file_pieces(target.ckpt, tf), params, lambda files: {f: torch.zeros(target.ckpt.shape(f)) for f in files})


def _name_map(model: Model) -> dict[str, str]:
    """Every way a UNet tensor may be keyed (LDM single file, diffusers folder) -> diffusers name."""
    out = {}
    for n in model.unet_param_names():
        out[LDM_UNET + diffusers_to_ldm(n, model.unet_config)] = n
        out["unet/" + n] = n
    return out


def _concepts(meta: dict[str, str]) -> list[str]:
    try:
        return json.loads(meta.get("erase.concepts", "[]"))
    except json.JSONDecodeError:
        return []


def load_delta(source: Path, *, base: Target | None, base_sha: str | None, target: Target, force: bool) -> Delta:
    ckpt = open_checkpoint(source)
    recorded = ckpt.metadata.get("erase.input_sha256")
    if ckpt.metadata.get("erase.kind") == "delta":
        keys = list(ckpt.keys())
        tensors = {k: ckpt.get(k).float() for k in keys}
        family = ckpt.metadata.get("erase.family", "")
    else:
        if base is None:
            raise UsageError(f"{source} is a checkpoint: pass --base (the model it was erased from) to compute its delta")
        family = open_target(source).family
        tensors = _difference(ckpt, base.ckpt)
    if base_sha is not None and recorded and recorded != base_sha and not force:
        raise EraseError(f"{source} was erased from a model with sha256 {recorded[:12]}…, not --base ({base_sha[:12]}…); "
                         "pass --force to merge anyway")
    if base_sha is not None and not recorded and not force and ckpt.metadata.get("erase.kind") != "delta":
        raise EraseError(f"{source} has no erase provenance (erase.input_sha256); pass --force if it really derives from --base")
    names = target.names
    if target.transformer is not None and any(k not in names for k in tensors):  # taken in another layout of the model
        tensors = in_target_layout(target, tensors)
    unknown = [k for k in tensors if k not in names]
    if unknown:
        raise EraseError(f"{source}: {len(unknown)} changed tensors are not UNet parameters of the target (e.g. {unknown[0]})")
    return Delta(source, {names[k]: v for k, v in tensors.items()}, recorded, family, _concepts(ckpt.metadata))


def _difference(source: Checkpoint, base: Checkpoint) -> dict[str, torch.Tensor]:
    """SOURCE - BASE on the tensors that differ (fp32)."""
    out = {}
    for k, info in source.tensors.items():
        if k not in base.tensors:
            continue
        if base.tensors[k].shape != info.shape:
            raise EraseError(f"{source.path}: {k} has shape {list(info.shape)}, the base {list(base.tensors[k].shape)}")
        a, b = source.get(k), base.get(k)
        if not torch.equal(a, b):
            out[k] = a.float() - b.float()
    if not out:
        raise EraseError(f"{source.path} is identical to the base: nothing to merge")
    return out


def combine(deltas: list[Delta]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for d in deltas:
        for n, v in d.tensors.items():
            total[n] = total.get(n, 0) + d.weight * v
    return total


def merge(target_path: Path, sources: list[Path], out: Path, *, base_path: Path | None = None, weights: list[float] | None = None,
          force: bool = False, lora_rank: int | None = None) -> dict:
    weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise UsageError(f"--weights has {len(weights)} values for {len(sources)} sources")
    if not sources:
        raise UsageError("give at least one SOURCE")
    target = open_target(target_path)
    check_output_path(target_path, out, force=force)
    base = open_target(base_path) if base_path else None
    base_sha = sha256_file(base_path) if base_path else None
    if base is not None and base.family != target.family:
        raise EraseError(f"--base is {base.label}, the target {target.label}: refusing to mix families")
    deltas = []
    for src, w in zip(sources, weights):
        d = load_delta(src, base=base, base_sha=base_sha, target=target, force=force)
        if d.family and d.family != target.family:
            raise EraseError(f"{src} is a {d.family} erasure; the target is {target.family}")
        d.weight = w
        deltas.append(d)
    total = combine(deltas)
    target_sha = sha256_file(target_path)
    bases = {d.base_sha256 for d in deltas if d.base_sha256}
    carried = bool(bases) and target_sha not in bases
    sources_info = [{"path": d.path.name, "concepts": d.concepts, "weight": d.weight, "base_sha256": d.base_sha256} for d in deltas]
    if lora_rank is not None:
        from erase.lora import export_lora

        if target.model is None:  # SD3 / FLUX.1: the file tensors' deltas as the transformer's parameters
            return export_lora(None, parameter_deltas(target, total), out, rank=lora_rank, sources=sources_info, family=target.family)
        return export_lora(target.model, total, out, rank=lora_rank, sources=sources_info)
    replacements = {}
    for n, d in total.items():
        key = target.key(n)
        if tuple(target.ckpt.shape(key)) != tuple(d.shape):
            raise EraseError(f"{key}: the target's shape {list(target.ckpt.shape(key))} differs from the delta's {list(d.shape)}")
        replacements[key] = target.ckpt.get(key).float() + d
    concepts = list(dict.fromkeys(c for d in deltas for c in d.concepts))
    fields = {"kind": "merge", "method": "merge", "concepts": concepts, "sources": sources_info,
              "carried_onto_other_model": carried}
    drop, dropped_meta = ema_drop(target.ckpt)
    meta = {**provenance(target.ckpt, fields, input_sha256=target_sha), **dropped_meta}
    write_checkpoint(target.ckpt, out, replacements, metadata=meta, drop=drop)
    return {"output": str(out), "changed_tensors": len(replacements), "concepts": concepts, "sources": sources_info,
            "carried_onto_other_model": carried}
