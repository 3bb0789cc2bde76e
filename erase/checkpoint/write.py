"""The surgical writer: the output is the input with only the changed tensors' bytes replaced.

Never re-serialises the model. Every untouched tensor is copied as raw bytes from the
input's byte range (so it stays byte-identical and writing costs about what `cp` costs),
replaced tensors are cast to the file's own dtype and checked against the stored shape,
existing `__metadata__` is kept, provenance is added under `erase.*`. The file is written
to a temp file beside the target, fsynced, and moved into place with `os.replace`, so the
output appears only complete. A diffusers folder is copied and its UNet file patched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from erase.checkpoint.formats import SAFETENSORS_DTYPES, Checkpoint, component_weight_files, open_checkpoint, weights_variant
from erase.errors import EraseError, UsageError

CHUNK = 16 * 1024 * 1024


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a diffusers folder's files (sorted, with their relative names)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def report_path(out: str | os.PathLike) -> Path:
    """The JSON report written beside an output file: o.safetensors -> o.report.json."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".report.json")


def check_output_path(src: str | os.PathLike, dst: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse to overwrite the input, or an existing file without `force`. Returns dst as a Path."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise UsageError(f"output {dst} is the input; choose another --out (erase never overwrites its input)")
    if dst.exists() and not force:
        raise UsageError(f"output {dst} already exists; pass --force to replace it")
    if not dst.parent.is_dir():
        raise UsageError(f"output folder {dst.parent} does not exist" + (" (it is a file)" if dst.parent.exists() else ""))
    return dst


def provenance(ckpt: Checkpoint, fields: dict[str, object], *, input_sha256: str) -> dict[str, str | None]:
    """`erase.*` metadata for a new output. Earlier `erase.*` provenance moves into `erase.history`."""
    from datetime import datetime, timezone

    from erase import __version__

    earlier = {k: v for k, v in ckpt.metadata.items() if k.startswith("erase.") and not k.startswith(("erase.model.", "erase.history"))}
    history = json.loads(ckpt.metadata.get("erase.history", "[]"))
    if earlier:
        history.append(earlier)
    meta = {f"erase.{k}": v if isinstance(v, str) else json.dumps(v, default=str) for k, v in fields.items()}
    meta.update({
        "erase.version": __version__,
        "erase.input_sha256": input_sha256,
        "erase.input_name": ckpt.path.name,
        "erase.created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    # keys of the earlier erasure that this one does not set must not linger as if they were ours
    stale = {k: None for k in earlier if k not in meta}  # None = remove the key
    if history:
        meta["erase.history"] = json.dumps(history)
    return {**stale, **meta}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _prepare(ckpt: Checkpoint, replacements: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in replacements.items():
        if name not in ckpt.tensors:
            raise EraseError(f"cannot replace '{name}': no such tensor in {ckpt.path}")
        info = ckpt.tensors[name]
        if tuple(t.shape) != info.shape:
            raise EraseError(f"cannot replace '{name}': shape {list(t.shape)} differs from the file's {list(info.shape)}")
        if not torch.isfinite(t).all():
            raise EraseError(f"refusing to write '{name}': it contains NaN or inf")
        out[name] = t.detach().to(SAFETENSORS_DTYPES[info.dtype][0])
    return out


def write_safetensors(
    ckpt: Checkpoint,
    dst: str | os.PathLike,
    replacements: dict[str, torch.Tensor],
    *,
    metadata: dict[str, str | None] | None = None,
    drop: set[str] | frozenset[str] = frozenset(),
) -> Path:
    """Write `ckpt` to `dst` as .safetensors with `replacements` and `metadata` merged in.

    `ckpt` may be a safetensors or pickle checkpoint (the latter is written in full, once).
    Tensors named in `drop` are left out. Returns the path written.
    """
    dst = Path(dst)
    names = [n for n in ckpt.tensors if n not in drop]
    if ckpt.format == "safetensors":
        names.sort(key=lambda n: ckpt.tensors[n].start)  # keep the input's order: untouched offsets stay the same
    new = _prepare(ckpt, replacements, names)
    meta = {k: v for k, v in {**ckpt.metadata, **(metadata or {})}.items() if v is not None}
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for n in names:
        info = ckpt.tensors[n]
        header[n] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            src = open(ckpt.path, "rb") if ckpt.format == "safetensors" else None
            try:
                run_start, run_len = 0, 0  # a run of untouched, contiguous input bytes, copied in one go
                for n in names:
                    info = ckpt.tensors[n]
                    if n not in new and src is not None and run_len and info.start == run_start + run_len:
                        run_len += info.nbytes
                        continue
                    if run_len:
                        _copy_range(src, out, run_start, run_len)
                        run_len = 0
                    if n in new:
                        out.write(_tensor_bytes(new[n]))
                    elif src is not None:
                        run_start, run_len = info.start, info.nbytes
                    else:
                        out.write(_tensor_bytes(ckpt.get(n)))
                if run_len:
                    _copy_range(src, out, run_start, run_len)
            finally:
                if src is not None:
                    src.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _copy_range(src, out, start: int, length: int) -> None:
    """Copy bytes [start, start + length) of src to out's current position (in-kernel where possible)."""
    out.flush()
    if hasattr(os, "copy_file_range"):
        pos = out.tell()
        try:
            while length > 0:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(length, 1 << 30), start, pos)
                if n == 0:
                    raise EraseError(f"{src.name}: file ended early while copying (was it modified during the run?)")
                start, pos, length = start + n, pos + n, length - n
            out.seek(pos)
            return
        except OSError:  # e.g. across file systems on old kernels: fall back to a plain copy
            out.seek(pos)
    src.seek(start)
    while length > 0:
        chunk = src.read(min(CHUNK, length))
        if not chunk:
            raise EraseError(f"{src.name}: file ended early while copying (was it modified during the run?)")
        out.write(chunk)
        length -= len(chunk)


def write_diffusers_folder(ckpt: Checkpoint, dst: str | os.PathLike, replacements: dict[str, torch.Tensor], *, metadata: dict[str, str]) -> Path:
    """Copy a diffusers folder and patch its denoiser's weights (names `unet/<key>` or `transformer/<key>`).

    Every safetensors file of the component that holds a replaced tensor is patched, variants included
    (`diffusion_pytorch_model.fp16.safetensors`), so that no loading option picks up un-erased weights; a shard that holds
    none is copied as it is. Pickles (`.bin`), which cannot be patched in place, are left out of the copy and named in
    the metadata.
    """
    dst = Path(dst)
    component = "transformer" if "transformer" in ckpt.component_configs else "unet"
    component_dir = ckpt.path / component
    files = component_weight_files(component_dir)
    patch = [f for f in files if f.suffix == ".safetensors"]
    if not patch:
        raise EraseError(f"{component_dir}: writing needs the {component} as .safetensors, not a pickle")
    left_out = [f.name for f in files if f not in patch]
    if left_out:
        metadata = {**metadata, "erase.dropped": f"{component}/{f', {component}/'.join(left_out)} (pickled {component} weights, not "
                                                 "patchable: they would keep the un-erased model)"}
    patched = {k[len(component) + 1:]: v for k, v in replacements.items()}
    shards = {f: open_checkpoint(f) for f in patch}
    patch = [f for f in patch if any(k in shards[f].tensors for k in patched)]  # a shard holding nothing trained is copied
    for variant in {weights_variant(f) for f in shards}:
        held = {k for f in patch if weights_variant(f) == variant for k in shards[f].tensors}
        if missing := sorted(set(patched) - held):
            raise EraseError(f"cannot replace '{component}/{missing[0]}': no {variant or 'plain'} weights file of {component_dir} holds it")
    skip = {f.name for f in files if f not in shards or f in patch}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(ckpt.path, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n in skip] if Path(d) == component_dir else [])
        for f in patch:
            mine = {k: v for k, v in patched.items() if k in shards[f].tensors}
            write_safetensors(shards[f], tmp / f.relative_to(ckpt.path), mine, metadata=metadata)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def write_checkpoint(ckpt: Checkpoint, dst: str | os.PathLike, replacements: dict[str, torch.Tensor], *, metadata: dict[str, str], drop=frozenset()) -> Path:
    """Write the patched checkpoint in the input's own form (single file, or diffusers folder)."""
    if ckpt.format == "diffusers":
        return write_diffusers_folder(ckpt, dst, replacements, metadata=metadata)
    return write_safetensors(ckpt, dst, replacements, metadata=metadata, drop=drop)
