"""The SD3 / FLUX.1 key map: the same rows as diffusers' converters, both ways, and a write that touches only trained rows."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from erase.checkpoint.formats import open_checkpoint
from erase.checkpoint.transformer_files import read_transformer_file
from erase.checkpoint.transformer_keymap import assemble, release_state, splice, transformer_pieces
from erase.checkpoint.write import write_checkpoint
from tests.transformer_layouts import flux_model, flux_shapes, sd3_model, sd3_shapes, tensors

W, HEADS = 32, 2


def _numbered(shapes: dict) -> dict[str, torch.Tensor]:
    """Each file tensor as its rows only, numbered: row r of the k-th tensor holds k * 1e6 + r. The converters only move
    rows (chunk, split, cat), so what they output says, row by row, where it came from."""
    return {n: torch.arange(s[0], dtype=torch.float64) + k * 1e6 for k, (n, s) in enumerate(shapes.items())}


@pytest.mark.parametrize("shapes, family, prefix, width", [
    (sd3_shapes(W, HEADS, 3, qk_norm=False), "sd3", "model.diffusion_model.", W),
    (sd3_shapes(W, HEADS, 3, dual=(0, 1)), "sd3", "model.diffusion_model.", W),
    # diffusers' FLUX.1 converter assumes the released width: checked there (rows only, so it stays small)
    (flux_shapes(3072, 24, 2, 2), "flux", "", 3072),
    (flux_shapes(3072, 24, 1, 1, guidance=False, prefix="model.diffusion_model."), "flux", "model.diffusion_model.", 3072),
    (flux_shapes(3072, 24, 1, 1, prefix="model.diffusion_model.", all_in_one=True), "flux", "model.diffusion_model.", 3072),
], ids=["sd3", "sd35-medium", "flux-dev", "flux-schnell-comfyui", "flux-dev-comfyui-all-in-one"])
def test_the_key_map_moves_every_row_where_diffusers_converters_do(shapes, family, prefix, width):
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers, convert_sd3_transformer_checkpoint_to_diffusers

    convert = convert_sd3_transformer_checkpoint_to_diffusers if family == "sd3" else convert_flux_transformer_checkpoint_to_diffusers
    numbered = _numbered(shapes)
    want = convert(dict(numbered))
    got = assemble(transformer_pieces(family, shapes, prefix, width), lambda names: {n: numbered[n] for n in names})
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _write(tmp_path, shapes) -> "open_checkpoint":
    path = tmp_path / "in.safetensors"
    save_file(tensors(shapes), str(path))
    return open_checkpoint(path)


@pytest.mark.parametrize("release", ["sd35-medium", "flux-dev"])
def test_a_trained_text_projection_is_spliced_into_its_rows_and_nothing_else_changes(tmp_path, release):
    if release == "sd35-medium":
        shapes = sd3_shapes(W, HEADS, 2, dual=(0,), text_encoders=("clip_l",), vae=True)
        model = sd3_model(W, HEADS, 2, dual=(0,))
        fused = "model.diffusion_model.joint_blocks.1.context_block.attn.qkv"
    else:
        shapes = flux_shapes(W, HEADS, 2, 1)
        model = flux_model(W, HEADS, 2, 1)
        fused = "double_blocks.1.txt_attn.qkv"
    ckpt = _write(tmp_path, shapes)
    tf = read_transformer_file(ckpt)
    pieces = transformer_pieces(tf.family, {n: ckpt.shape(n) for n in ckpt.tensors}, tf.prefix, tf.width)
    model.load_state_dict(assemble(pieces, ckpt.get_many), strict=True)  # the whole file, into diffusers' own model

    trained = {"transformer_blocks.1.attn.add_k_proj.weight": model.transformer_blocks[1].attn.add_k_proj.weight.detach() + 0.5,
               "transformer_blocks.1.attn.add_v_proj.bias": model.transformer_blocks[1].attn.add_v_proj.bias.detach() - 0.5}
    out = write_checkpoint(ckpt, tmp_path / "out.safetensors", splice(pieces, trained, ckpt.get_many), metadata={})

    before, after = load_file(str(ckpt.path)), load_file(str(out))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {f"{fused}.weight", f"{fused}.bias"}  # every other tensor, text encoder and VAE too, byte for byte
    rows = lambda a, b: {i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])}  # noqa: E731
    assert rows(before[f"{fused}.weight"], after[f"{fused}.weight"]) == set(range(W, 2 * W))  # the keys' rows alone
    assert rows(before[f"{fused}.bias"], after[f"{fused}.bias"]) == set(range(2 * W, 3 * W))  # the values' rows alone
    assert after[f"{fused}.weight"].dtype == before[f"{fused}.weight"].dtype  # written in the file's own dtype
    reread = assemble(pieces, open_checkpoint(out).get_many)
    for name, value in trained.items():
        assert torch.equal(reread[name], value.to(torch.bfloat16))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_model_trained_here_is_written_in_its_releases_names_and_reads_back_row_for_row(family):
    """release_state (the shapes-world FLUX.1's export): a diffusers transformer's parameters as the release layout's
    tensors, named and shaped as the publishers' files (tests/transformer_layouts.py), which the key map reads back to
    the same parameters, every row in its place (q, k, v fused; the final modulation's halves swapped)."""
    torch.manual_seed(0)
    prefix = "model.diffusion_model." if family == "sd3" else ""  # Stability's files prefix the transformer, BFL's do not
    model, shapes = (sd3_model(32, 2, 2), sd3_shapes(32, 2, 2)) if family == "sd3" else (flux_model(32, 2, 2, 2), flux_shapes(32, 2, 2, 2))
    state = {k: v + torch.randn(v.shape) for k, v in model.state_dict().items()}  # no two rows alike
    release = release_state(family, state, 32, prefix)
    assert {k: tuple(v.shape) for k, v in release.items()} == shapes
    back = assemble(transformer_pieces(family, shapes, prefix, 32), lambda names: {n: release[n] for n in names})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
