"""Read checkpoint files lazily: single-file .safetensors / .ckpt and diffusers folders.

`open_checkpoint(path)` reads only the header (or, for a pickle, the tensors' storage
through `torch.load(weights_only=True, mmap=True)`), validates it, and returns a
`Checkpoint`: a name -> `TensorInfo` table plus `get(name)` that loads one tensor on demand.

A diffusers folder is presented with component-prefixed names (`unet/<key>`, `vae/<key>`,
`text_encoder/<key>`, `text_encoder_2/<key>`) so that every command sees one table; an SD3 / FLUX.1 pipeline folder
lists only its transformer's (`transformer/<key>`: its other components load through diffusers and transformers).
A component's shards are read as one; the folder's metadata is the erase provenance its denoiser's files carry.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.errors import EraseError

# safetensors dtype code -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_SAFETENSORS = {dt: code for code, (dt, _) in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TRANSFORMER_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")  # SD3 / FLUX.1 pipelines


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code ("F16", "F32", ...)
    shape: tuple[int, ...]
    file: Path  # the file that holds the tensor
    start: int = -1  # absolute byte offsets in `file` (safetensors only; -1 otherwise)
    end: int = -1

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPES[self.dtype][1]


@dataclass
class Checkpoint:
    """A checkpoint opened for lazy reading. `format` is "safetensors", "ckpt" or "diffusers"."""

    path: Path
    format: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    # diffusers folders: component name -> its config.json contents
    component_configs: dict[str, dict] = field(default_factory=dict)
    _pickled: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU, the file's dtype)."""
        return self.get_many([name])[name]

    def get_many(self, names) -> dict[str, torch.Tensor]:
        """Load several tensors, opening each file once. Every tensor gets memory of its own, read with plain
        reads from the byte ranges the header gave (rather than safetensors' `safe_open`, whose tensors keep the
        whole file's mapping resident while any of them lives): a loader can then convert each tensor (fp16 ->
        fp32) and drop the file's copy, so loading a UNet never holds it twice (benchmarks/real_size.py)."""
        if self._pickled is not None:
            return {n: self._pickled[n] for n in names}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out = {}
        for file, group in by_file.items():
            if file.suffix != ".safetensors":  # a diffusers .bin component
                state = _load_pickle(file)
                out.update({n: state[n.split("/", 1)[1] if self.format == "diffusers" else n] for n in group})
                continue
            with open(file, "rb") as f:
                for n in sorted(group, key=lambda n: self.tensors[n].start):
                    out[n] = _read_tensor(f, self.tensors[n])
        return out

    def dtypes(self) -> dict[str, int]:
        """dtype code -> number of tensors."""
        out: dict[str, int] = {}
        for info in self.tensors.values():
            out[info.dtype] = out.get(info.dtype, 0) + 1
        return out


def _read_tensor(f, info: TensorInfo) -> torch.Tensor:
    """One tensor from its byte range (safetensors stores little-endian, C order)."""
    # torch's own allocation (aligned as torch aligns tensors: kernels then take the same paths as for any tensor)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.start)
    if info.nbytes and f.readinto(buf.numpy()) != info.nbytes:
        raise EraseError(f"{info.file}: file ended early (was it modified while being read?)")
    return buf.view(SAFETENSORS_DTYPES[info.dtype][0]).reshape(info.shape)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint by its path; raise `EraseError` with a one-line reason if it is unusable.

    >>> ckpt = open_checkpoint("model.safetensors")  # doctest: +SKIP
    >>> ckpt.get("model.diffusion_model.out.2.bias").shape  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise EraseError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_diffusers_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _open_safetensors(path)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return _open_pickle(path)
    raise EraseError(f"{path}: unknown checkpoint type '{suffix}' (expected .safetensors, .ckpt, .pt or a diffusers folder)")


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (tensors, metadata, header length).

    We parse it ourselves (rather than only `safe_open`) because the writer needs each
    tensor's byte range, and because a clear one-line error beats the library's for a
    truncated or lying file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise EraseError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise EraseError(f"{path}: not a valid safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EraseError(f"{path}: not a valid safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise EraseError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise EraseError(f"{path}: invalid safetensors metadata (must map strings to strings)")
    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise EraseError(f"{path}: invalid safetensors header entry for '{name}'") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise EraseError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        info = TensorInfo(dtype, shape, path, data_start + begin, data_start + end)
        if any(d < 0 for d in shape) or not (0 <= begin <= end <= data_size) or end - begin != info.nbytes:
            raise EraseError(
                f"{path}: header lies about tensor '{name}' (shape {list(shape)} {dtype} needs {info.nbytes} bytes, "
                f"offsets {begin}..{end} in a {data_size}-byte data section): the file is truncated or corrupt"
            )
        tensors[name] = info
    # Tensors must tile the data section exactly (no overlaps, no gaps, nothing missing).
    covered = 0
    for info in sorted(tensors.values(), key=lambda t: t.start):
        if info.start - data_start != covered:
            raise EraseError(f"{path}: tensor byte ranges overlap or leave gaps: the file is corrupt")
        covered = info.end - data_start
    if covered != data_size:
        raise EraseError(f"{path}: data section is {data_size} bytes but tensors cover {covered}: truncated or corrupt")
    return tensors, metadata, n


def _open_safetensors(path: Path) -> Checkpoint:
    tensors, metadata, _ = read_safetensors_header(path)
    return Checkpoint(path=path, format="safetensors", tensors=tensors, metadata=metadata)


# Globals that training checkpoints reference outside their weights: the official SD 1.x .ckpt files keep PyTorch
# Lightning's `{ModelCheckpoint: {...}}` under "callbacks", with numpy scalars inside (A1111's safe unpickler
# allow-lists the same few). They are loaded as inert stubs, so no code from the file runs; anything else is refused.
INERT_GLOBALS = ("pytorch_lightning.", "lightning.", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                 "numpy.dtype", "_codecs.encode")


class _Inert:
    """Stands in for a training-time object (a Lightning callback, a numpy scalar) that erase never uses."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _inert_stubs(path: Path) -> list[tuple[type, str]] | None:
    """Stubs for the file's non-torch globals when every one of them is on INERT_GLOBALS, else None."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint, or unreadable: the caller reports the original failure
        return None
    if not names or not all(n.startswith(INERT_GLOBALS) for n in names):
        return None
    return [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that holds code is refused, never executed."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            stubs = _inert_stubs(path)
            if stubs is None:
                raise
            with torch.serialization.safe_globals(stubs):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EraseError(
            f"{path}: refused to load this pickle checkpoint safely (torch.load weights_only=True: {first[:160]}). "
            "Convert it to .safetensors with a tool you trust."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise EraseError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _open_pickle(path: Path) -> Checkpoint:
    state = _load_pickle(path)
    if not state:
        raise EraseError(f"{path}: the pickle holds no tensors")
    tensors = {}
    for name, t in state.items():
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise EraseError(f"{path}: tensor '{name}' has unsupported dtype {t.dtype}")
        tensors[name] = TensorInfo(TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), path)
    return Checkpoint(path=path, format="ckpt", tensors=tensors, _pickled=state)


# a component's weights: one file, or shards (`-00001-of-00003`, as diffusers' save_pretrained splits large models), each
# possibly a variant (`.fp16`)
_WEIGHTS_FILE = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?(\.[A-Za-z0-9_-]+)?\.(safetensors|bin)$")


def component_weight_files(folder: Path) -> list[Path]:
    """Every weights file of one diffusers component, the one erase reads first: plain names before
    variants (`diffusion_pytorch_model.fp16.safetensors`), safetensors before pickles."""
    if not folder.is_dir():
        return []
    files = [f for f in folder.iterdir() if f.is_file() and _WEIGHTS_FILE.match(f.name)]
    return sorted(files, key=lambda f: (f.suffix != ".safetensors", weights_variant(f) is not None, f.name))


def weights_variant(file: Path) -> str | None:
    """A component weights file's variant (`.fp16` -> "fp16"), None for the plain weights."""
    variant = _WEIGHTS_FILE.match(file.name).group(3)
    return variant[1:] if variant else None


def component_weights(folder: Path) -> list[Path]:
    """The files erase reads for one component: every shard of the first kind `component_weight_files` ranks."""
    files = component_weight_files(folder)
    kind = lambda f: (f.suffix, weights_variant(f))  # noqa: E731
    return [f for f in files if kind(f) == kind(files[0])] if files else []


def _component_tensors(folder: Path, comp: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """One component's tensors, named `comp/<key>`, from all of its shards, and the erase provenance its safetensors
    files carry (`erase.*`: an erased folder's, written into the denoiser's patched files)."""
    tensors: dict[str, TensorInfo] = {}
    provenance: dict[str, str] = {}
    for weights in component_weights(folder):
        if weights.suffix == ".safetensors":
            part, metadata, _ = read_safetensors_header(weights)
            provenance.update({k: v for k, v in metadata.items() if k.startswith("erase.") and not k.startswith("erase.model.")})
        else:
            part = {k: TensorInfo(TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), weights) for k, t in _load_pickle(weights).items()}
        tensors.update({f"{comp}/{k}": v for k, v in part.items()})
    return tensors, provenance


def _open_diffusers_folder(path: Path) -> Checkpoint:
    index = path / "model_index.json"
    if not index.exists():
        raise EraseError(f"{path}: a folder, but not a diffusers model (no model_index.json)")
    try:
        json.loads(index.read_text())
    except json.JSONDecodeError:
        raise EraseError(f"{index}: not valid JSON") from None
    transformer = path / "transformer" / "config.json"
    components = TRANSFORMER_COMPONENTS if transformer.exists() else DIFFUSERS_COMPONENTS
    listed = ("transformer",) if transformer.exists() else DIFFUSERS_COMPONENTS  # the components whose tensors erase reads
    if transformer.exists():  # SD3 / SD3.5 or FLUX.1: the transformer's tensors; the rest loads by diffusers' from_pretrained
        from erase.checkpoint.transformer_files import TRANSFORMER_CLASSES

        name = json.loads(transformer.read_text()).get("_class_name", "an unknown transformer")
        if name not in TRANSFORMER_CLASSES:
            raise EraseError(f"unsupported: a diffusers folder of {name}; erase reads Stable Diffusion 1.x, 2.x and XL, SD3 / SD3.5 "
                             "and FLUX.1")
    tensors: dict[str, TensorInfo] = {}
    configs: dict[str, dict] = {}
    metadata: dict[str, str] = {}
    for comp in components:
        folder = path / comp
        if not component_weights(folder) or not (folder / "config.json").exists():
            continue
        configs[comp] = json.loads((folder / "config.json").read_text())
        if comp in listed:
            part, provenance = _component_tensors(folder, comp)
            tensors.update(part)
            if comp in ("unet", "transformer"):
                metadata = provenance
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.exists():
        configs["scheduler"] = json.loads(scheduler.read_text())
    denoiser = "transformer" if transformer.exists() else "unet"
    if not any(k.startswith(denoiser + "/") for k in tensors):
        raise EraseError(f"{path}: diffusers folder without {denoiser} weights ({denoiser}/diffusion_pytorch_model*.safetensors)")
    return Checkpoint(path=path, format="diffusers", tensors=tensors, metadata=metadata, component_configs=configs)
