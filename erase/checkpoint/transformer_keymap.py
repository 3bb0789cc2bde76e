"""SD3 / SD3.5 and FLUX.1 single-file tensors <-> diffusers' SD3Transformer2DModel / FluxTransformer2DModel parameters.

The release layouts fuse what diffusers keeps apart: q, k and v in one `qkv` tensor (FLUX.1's single blocks also put the
MLP's input in `linear1`), and the final modulation stores (shift, scale) where diffusers wants (scale, shift). So a
parameter is assembled from row ranges of file tensors, and a trained parameter is written back by splicing its rows
into the file tensor it came from: every other row, and every other tensor, keeps its bytes.

diffusers' single-file converters know these layouts but read one way only, and the FLUX.1 one assumes the released
width (3072); this map works at any width and both ways. tests/test_transformer_keymap.py checks it row by row against
the converters (SD3 at tiny width, FLUX.1 at full width).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from erase.checkpoint.transformer_files import OTHER_COMPONENTS
from erase.errors import EraseError


@dataclass(frozen=True)
class Piece:
    """Rows `rows` of file tensor `file` are rows `at` of diffusers parameter `name` (None: the whole tensor)."""

    file: str
    rows: tuple[int, int] | None
    name: str
    at: tuple[int, int] | None = None


def _thirds(w: int) -> list[tuple[int, int]]:
    return [(0, w), (w, 2 * w), (2 * w, 3 * w)]


def _swapped(file: str, name: str, w: int) -> list[Piece]:
    """The release's (shift, scale) rows as diffusers' (scale, shift)."""
    return [Piece(file, (w, 2 * w), name, (0, w)), Piece(file, (0, w), name, (w, 2 * w))]


SD3_RENAMES = [  # release name (without prefix) -> diffusers name, for tensors taken whole
    (r"pos_embed", "pos_embed.pos_embed"),
    (r"x_embedder\.proj\.(\w+)", r"pos_embed.proj.\1"),
    (r"t_embedder\.mlp\.0\.(\w+)", r"time_text_embed.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(\w+)", r"time_text_embed.timestep_embedder.linear_2.\1"),
    (r"y_embedder\.mlp\.0\.(\w+)", r"time_text_embed.text_embedder.linear_1.\1"),
    (r"y_embedder\.mlp\.2\.(\w+)", r"time_text_embed.text_embedder.linear_2.\1"),
    (r"context_embedder\.(\w+)", r"context_embedder.\1"),
    (r"final_layer\.linear\.(\w+)", r"proj_out.\1"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.proj\.(\w+)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.ln_q\.(\w+)", r"transformer_blocks.\1.attn.norm_q.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn\.ln_k\.(\w+)", r"transformer_blocks.\1.attn.norm_k.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.proj\.(\w+)", r"transformer_blocks.\1.attn2.to_out.0.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.ln_q\.(\w+)", r"transformer_blocks.\1.attn2.norm_q.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.ln_k\.(\w+)", r"transformer_blocks.\1.attn2.norm_k.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc1\.(\w+)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.mlp\.fc2\.(\w+)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"joint_blocks\.(\d+)\.x_block\.adaLN_modulation\.1\.(\w+)", r"transformer_blocks.\1.norm1.linear.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1\.(\w+)", r"transformer_blocks.\1.norm1_context.linear.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.proj\.(\w+)", r"transformer_blocks.\1.attn.to_add_out.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.ln_q\.(\w+)", r"transformer_blocks.\1.attn.norm_added_q.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.ln_k\.(\w+)", r"transformer_blocks.\1.attn.norm_added_k.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc1\.(\w+)", r"transformer_blocks.\1.ff_context.net.0.proj.\2"),
    (r"joint_blocks\.(\d+)\.context_block\.mlp\.fc2\.(\w+)", r"transformer_blocks.\1.ff_context.net.2.\2"),
]
SD3_FUSED = [  # release qkv -> diffusers q, k, v
    (r"joint_blocks\.(\d+)\.x_block\.attn\.qkv\.(\w+)", [r"transformer_blocks.\1.attn.to_{}.\2"], "qkv"),
    (r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.(\w+)", [r"transformer_blocks.\1.attn2.to_{}.\2"], "qkv"),
    (r"joint_blocks\.(\d+)\.context_block\.attn\.qkv\.(\w+)", [r"transformer_blocks.\1.attn.add_{}_proj.\2"], "qkv"),
]
FLUX_RENAMES = [
    (r"img_in\.(\w+)", r"x_embedder.\1"),
    (r"txt_in\.(\w+)", r"context_embedder.\1"),
    (r"time_in\.in_layer\.(\w+)", r"time_text_embed.timestep_embedder.linear_1.\1"),
    (r"time_in\.out_layer\.(\w+)", r"time_text_embed.timestep_embedder.linear_2.\1"),
    (r"vector_in\.in_layer\.(\w+)", r"time_text_embed.text_embedder.linear_1.\1"),
    (r"vector_in\.out_layer\.(\w+)", r"time_text_embed.text_embedder.linear_2.\1"),
    (r"guidance_in\.in_layer\.(\w+)", r"time_text_embed.guidance_embedder.linear_1.\1"),
    (r"guidance_in\.out_layer\.(\w+)", r"time_text_embed.guidance_embedder.linear_2.\1"),
    (r"final_layer\.linear\.(\w+)", r"proj_out.\1"),
    (r"double_blocks\.(\d+)\.img_mod\.lin\.(\w+)", r"transformer_blocks.\1.norm1.linear.\2"),
    (r"double_blocks\.(\d+)\.txt_mod\.lin\.(\w+)", r"transformer_blocks.\1.norm1_context.linear.\2"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.proj\.(\w+)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj\.(\w+)", r"transformer_blocks.\1.attn.to_add_out.\2"),
    (r"double_blocks\.(\d+)\.img_mlp\.0\.(\w+)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (r"double_blocks\.(\d+)\.img_mlp\.2\.(\w+)", r"transformer_blocks.\1.ff.net.2.\2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0\.(\w+)", r"transformer_blocks.\1.ff_context.net.0.proj.\2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2\.(\w+)", r"transformer_blocks.\1.ff_context.net.2.\2"),
    (r"single_blocks\.(\d+)\.modulation\.lin\.(\w+)", r"single_transformer_blocks.\1.norm.linear.\2"),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"single_blocks\.(\d+)\.linear2\.(\w+)", r"single_transformer_blocks.\1.proj_out.\2"),
]
FLUX_FUSED = [
    (r"double_blocks\.(\d+)\.img_attn\.qkv\.(\w+)", [r"transformer_blocks.\1.attn.to_{}.\2"], "qkv"),
    (r"double_blocks\.(\d+)\.txt_attn\.qkv\.(\w+)", [r"transformer_blocks.\1.attn.add_{}_proj.\2"], "qkv"),
    (r"single_blocks\.(\d+)\.linear1\.(\w+)", [r"single_transformer_blocks.\1.attn.to_{}.\2", r"single_transformer_blocks.\1.proj_mlp.\2"],
     "qkv+mlp"),
]


def _pieces_of(local: str, rows: int, width: int, renames, fused) -> list[Piece] | None:
    for pattern, template in renames:
        if m := re.fullmatch(pattern, local):
            return [Piece(local, None, m.expand(template))]
    for pattern, (qkv, *rest), kind in fused:
        if m := re.fullmatch(pattern, local):
            pieces = [Piece(local, r, m.expand(qkv).format(x)) for r, x in zip(_thirds(width), "qkv")]
            if kind == "qkv+mlp":  # FLUX.1's single blocks: the MLP's input after q, k and v
                pieces.append(Piece(local, (3 * width, rows), m.expand(rest[0])))
            return pieces
    if re.fullmatch(r"final_layer\.adaLN_modulation\.1\.(\w+)", local):
        return _swapped(local, "norm_out.linear." + local.rsplit(".", 1)[1], width)
    return None


def transformer_pieces(family: str, shapes: dict[str, tuple[int, ...]], prefix: str, width: int) -> list[Piece]:
    """Every transformer tensor of a release file (`shapes`: its names and shapes, prefix included) as pieces of diffusers
    parameters. A name the map does not know is an error: nothing is guessed."""
    renames, fused = (SD3_RENAMES, SD3_FUSED) if family == "sd3" else (FLUX_RENAMES, FLUX_FUSED)
    out = []
    for name, shape in shapes.items():
        if not name.startswith(prefix) or name.startswith(OTHER_COMPONENTS):
            continue
        local = name[len(prefix):]
        # SD3's last text block is "pre only": its modulation is (shift, scale) alone, stored as the final layer's is
        pre_only = re.fullmatch(r"joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1\.(\w+)", local)
        if family == "sd3" and pre_only and shape[0] == 2 * width:
            pieces = _swapped(local, f"transformer_blocks.{pre_only[1]}.norm1_context.linear.{pre_only[2]}", width)
        else:
            pieces = _pieces_of(local, shape[0] if shape else 1, width, renames, fused)
        if pieces is None:
            raise EraseError(f"unsupported: {name} is not a tensor of the {family.upper()} layout erase knows")
        out += [Piece(prefix + p.file, p.rows, p.name, p.at) for p in pieces]
    return out


def assemble(pieces: list[Piece], read: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers' state dict from the file's tensors (`read(names)` loads them)."""
    tensors = read(sorted({p.file for p in pieces}))
    by_name: dict[str, list[Piece]] = {}
    for p in pieces:
        by_name.setdefault(p.name, []).append(p)
    out = {}
    for name, parts in by_name.items():
        if len(parts) == 1 and parts[0].rows is None:
            out[name] = tensors[parts[0].file]
            continue
        chunks = [tensors[p.file][p.rows[0]:p.rows[1]] for p in parts]
        if any(p.at is not None for p in parts):  # a row permutation (the swapped modulation)
            chunks = [c for _, c in sorted(zip((p.at[0] for p in parts), chunks), key=lambda x: x[0])]
        out[name] = chunks[0].clone() if len(chunks) == 1 else torch.cat(chunks)
    return out


def splice(pieces: list[Piece], trained: dict[str, torch.Tensor], read: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The file tensors that hold the `trained` diffusers parameters, with those parameters' rows written in (in the file's
    dtype) and every other row as it was: the replacements for erase.checkpoint.write."""
    touched = [p for p in pieces if p.name in trained]
    missing = set(trained) - {p.name for p in touched}
    if missing:
        raise EraseError(f"no tensor of the file holds {sorted(missing)[0]}")
    files = read(sorted({p.file for p in touched}))
    out = {f: t.clone() for f, t in files.items()}
    for p in touched:
        value = trained[p.name]
        part = value if p.at is None else value[p.at[0]:p.at[1]]
        if p.rows is None:
            out[p.file] = part.to(out[p.file].dtype).reshape(out[p.file].shape)
        else:
            out[p.file][p.rows[0]:p.rows[1]] = part.to(out[p.file].dtype)
    return out


def _release_name(pattern: str, match: re.Match) -> str:
    """The release name a rename `pattern` matches, its groups filled from `match` (the diffusers name's)."""
    groups = iter(match.groups())
    return re.sub(r"\(\\[dw]\+\)", lambda _: next(groups), pattern).replace("\\.", ".")


def _template_regex(pattern: str, template: str) -> str:
    """A diffusers-name template (`transformer_blocks.\\1.attn.to_{}.\\2`) as a regex of the names it makes, each
    back-reference the release `pattern`'s group of that number."""
    groups = re.findall(r"\(\\[dw]\+\)", pattern)
    parts = re.split(r"\\(\d)", template)
    return "".join(groups[int(p) - 1] if i % 2 else re.escape(p) for i, p in enumerate(parts))


def release_state(family: str, state: dict[str, torch.Tensor], width: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `assemble`: a diffusers SD3 / FLUX.1 transformer's state dict as the release layout's tensors (q, k, v
    and FLUX.1's single-block MLP input fused, the final modulation as (shift, scale)), for writing a model trained here
    as its family's single file. transformer_pieces reads the result back to `state` (tested)."""
    renames, fused = (SD3_RENAMES, SD3_FUSED) if family == "sd3" else (FLUX_RENAMES, FLUX_FUSED)
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, value in state.items():
        file = None
        swapped = re.fullmatch(r"norm_out\.linear\.(\w+)", name) or (
            family == "sd3" and value.shape[0] == 2 * width and re.fullmatch(r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)", name))
        if swapped:  # diffusers' (scale, shift) as the release's (shift, scale)
            file = ("final_layer.adaLN_modulation.1." + swapped[1] if name.startswith("norm_out.")
                    else f"joint_blocks.{swapped[1]}.context_block.adaLN_modulation.1.{swapped[2]}")
            parts[file] = {0: torch.cat([value[width:], value[:width]])}
            continue
        for pattern, template in renames:
            if m := re.fullmatch(_template_regex(pattern, template), name):
                file, order = _release_name(pattern, m), 0
                break
        else:
            for pattern, templates, _ in fused:
                for order, template in enumerate(t.format(x) for t in templates[:1] for x in "qkv"):
                    if m := re.fullmatch(_template_regex(pattern, template), name):
                        file = _release_name(pattern, m)
                        break
                if file is None and len(templates) > 1 and (m := re.fullmatch(_template_regex(pattern, templates[1]), name)):
                    file, order = _release_name(pattern, m), 3
                if file is not None:
                    break
        if file is None:
            raise EraseError(f"no tensor of the {family.upper()} release layout holds {name}")
        parts.setdefault(file, {})[order] = value
    return {prefix + f: torch.cat([p[k] for k in sorted(p)]) if len(p) > 1 else p[0] for f, p in parts.items()}
