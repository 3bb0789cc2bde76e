"""SD3 / SD3.5 and FLUX.1 files: recognised by release, described by `erase inspect`, refused by name elsewhere."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from erase.cli import app
from tests.transformer_layouts import flux_shapes, sd3_model, sd3_shapes, tensors

runner = CliRunner()
W, HEADS, DEPTH = 32, 2, 2


@pytest.mark.parametrize("variant", [dict(qk_norm=False), dict(qk_norm=True), dict(qk_norm=True, dual=(0,))], ids=["sd3", "sd35-large", "sd35-medium"])
def test_the_sd3_fixtures_are_the_layout_diffusers_reads(variant):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    original = tensors(sd3_shapes(W, HEADS, DEPTH, **variant), dtype=torch.float32)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original)
    assert not original  # the converter took every tensor: none of the fixture's names is foreign to the layout
    sd3_model(W, HEADS, DEPTH, **variant).load_state_dict(converted, strict=True)  # every name and shape


def test_the_flux_fixture_is_the_layout_diffusers_reads_at_full_width():
    """diffusers' FLUX.1 converter assumes the released width (3072), so the check runs there, on the meta device."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    original = tensors(flux_shapes(3072, 24, 1, 1, joint_dim=4096, pooled_dim=768, prefix="model.diffusion_model."), device="meta")
    converted = convert_flux_transformer_checkpoint_to_diffusers(original)
    assert not original
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    model.load_state_dict(converted, strict=True, assign=True)


def _write(tmp_path, shapes, name):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors(shapes), str(path))
    return path


def _inspect(path) -> dict:
    r = runner.invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_inspect_names_the_release_its_text_stream_and_what_the_file_carries(tmp_path):
    medium = _inspect(_write(tmp_path, sd3_shapes(W, HEADS, DEPTH, dual=(0,), text_encoders=("clip_l", "clip_g"), vae=True), "sd35m"))
    assert (medium["family"], medium["family_label"], medium["supported"]) == ("sd3", "SD3.5 medium", False)
    assert (medium["width"], medium["blocks"], medium["text_encoders"], medium["vae"]) == (W, DEPTH, ["clip_l", "clip_g"], True)
    # keys and values: rows W..3W of every context block's fused qkv, the pre-only last block's included
    assert medium["text_kv_parameters"] == DEPTH * (2 * W * W + 2 * W)
    assert medium["text_stream_parameters"] < medium["transformer_parameters"]
    large = _inspect(_write(tmp_path, sd3_shapes(W, HEADS, 3), "sd35l"))
    assert (large["family_label"], large["blocks"], large["text_encoders"], large["vae"]) == ("SD3.5 large", 3, [], False)
    assert _inspect(_write(tmp_path, sd3_shapes(W, HEADS, DEPTH, qk_norm=False), "sd3"))["family_label"] == "SD3 medium"

    dev = _inspect(_write(tmp_path, flux_shapes(W, HEADS, 2, 3, prefix="model.diffusion_model."), "dev"))
    assert (dev["family"], dev["family_label"], dev["blocks"], dev["single_blocks"]) == ("flux", "FLUX.1-dev", 2, 3)
    assert "ComfyUI" in dev["layout"] and dev["text_kv_parameters"] == 2 * (2 * W * W + 2 * W)
    comfy = _inspect(_write(tmp_path, flux_shapes(W, HEADS, 1, 1, prefix="model.diffusion_model.", all_in_one=True), "comfy"))
    assert (comfy["text_encoders"], comfy["vae"], comfy["text_kv_parameters"]) == (["clip_l", "t5xxl"], True, 2 * W * W + 2 * W)
    assert comfy["transformer_parameters"] == sum(math.prod(s) for s in flux_shapes(W, HEADS, 1, 1).values())  # the others apart
    schnell = _inspect(_write(tmp_path, flux_shapes(W, HEADS, 1, 1, guidance=False), "schnell"))
    assert schnell["family_label"] == "FLUX.1-schnell" and "ComfyUI" not in schnell["layout"]
    table = runner.invoke(app, ["inspect", str(tmp_path / "dev.safetensors")])
    assert table.exit_code == 0 and "FLUX.1-dev" in table.output and "text stream" in table.output
    assert "--text-encoders" in dev["support"] and "run (SDD, ESD" in large["support"] and "run (SDD, ESD" in dev["support"]  # what each file is good for


def test_a_diffusers_folder_of_these_families_is_described(tmp_path):
    """Sharded transformer weights (as the released FLUX.1 and SD3.5 large folders ship them), a text encoder, a VAE:
    inspect describes the pipeline (run and the other commands on folders: test_transformer_load)."""
    model = sd3_model(W, HEADS, DEPTH, dual=(0,))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    model.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    for component in ("text_encoder", "vae"):
        (tmp_path / component).mkdir()
        (tmp_path / component / "config.json").write_text("{}")
        save_file({"w": torch.zeros(2)}, str(tmp_path / component / ("model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors")))
    info = _inspect(tmp_path)
    assert (info["family_label"], info["layout"], info["supported"], info["text_encoders"], info["vae"]) == (
        "SD3.5 medium", "a diffusers folder", False, ["clip_l"], True)
    params = dict(model.named_parameters())
    assert info["transformer_parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert info["text_kv_parameters"] == sum(p.numel() for n, p in params.items() if ".add_k_proj." in n or ".add_v_proj." in n)
    assert info["tensor_count"] == len(model.state_dict())


def test_a_diffusers_folder_of_another_transformer_family_is_refused_by_its_class(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel"}))
    r = runner.invoke(app, ["inspect", str(tmp_path)])
    assert r.exit_code == 1 and "unsupported: a diffusers folder of QwenImageTransformer2DModel" in r.output


def test_inspects_text_stream_is_the_one_the_memory_bound_counts_in_diffusers_names(tmp_path):
    """benchmarks/transformer_memory.py counts the text stream by diffusers' module names; inspect by the release
    layout's. The same tiny SD3.5 file, read both ways, gives the same counts."""
    import importlib.util
    from pathlib import Path

    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    spec = importlib.util.spec_from_file_location("transformer_memory", Path(__file__).parents[1] / "benchmarks" / "transformer_memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    shapes = sd3_shapes(W, HEADS, 3, dual=(0,))
    info = _inspect(_write(tmp_path, shapes, "sd35m"))
    model = sd3_model(W, HEADS, 3, dual=(0,))
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(tensors(shapes, dtype=torch.float32)), strict=True)
    count = lambda keep: sum(p.numel() for n, p in model.named_parameters() if keep(n))  # noqa: E731
    assert count(memory.TRAIN_SETS["text k/v"]) == info["text_kv_parameters"]
    assert count(memory.TRAIN_SETS["text stream"]) == info["text_stream_parameters"]
    buffers = sum(b.numel() for b in model.buffers())  # the position table, a tensor of the file but not a parameter
    assert count(memory.TRAIN_SETS["all"]) + buffers == info["transformer_parameters"]
