"""Reading checkpoints: families, configs, bit-exact components, bad inputs."""

import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from erase.checkpoint.export import unet_to_ldm
from erase.checkpoint.families import detect_family
from erase.checkpoint.formats import open_checkpoint
from erase.checkpoint.keymap import diffusers_to_ldm
from erase.errors import EraseError, UsageError
from erase.models import load_tokenizer, open_model
from erase.tiny import tiny_components, write_tiny_checkpoint


def _equal_state(a: dict, b: dict) -> None:
    a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
    b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family,lpb", [("sd1", 1), ("sd1", 2), ("sd2", 2), ("sdxl", 2)])
def test_keymap_formula_agrees_with_diffusers_converter(family, lpb):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_components(family, lpb)["unet"]
    state = unet.state_dict()
    # tag every tensor uniquely by identity: the converter only renames
    back = convert_ldm_unet_checkpoint(unet_to_ldm(state, dict(unet.config)), dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)


def test_attn2_formula_from_design_doc():
    cfg = {"layers_per_block": 2, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert diffusers_to_ldm("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight", cfg) == \
        "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    assert diffusers_to_ldm("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.bias", cfg) == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.bias"
    assert diffusers_to_ldm("mid_block.attentions.0.transformer_blocks.0.attn2.to_q.weight", cfg) == \
        "middle_block.1.transformer_blocks.0.attn2.to_q.weight"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_components_load_bit_exact(tiny_files, family):
    ref = tiny_components(family)
    model = open_model(tiny_files[family])
    assert model.family.name == family
    _equal_state(model.load_unet().state_dict(), ref["unet"].state_dict())
    _equal_state(model.load_vae().state_dict(), ref["vae"].state_dict())
    text = model.load_text_encoder()
    for enc, name in zip(text.encoders, ["text_encoder", "text_encoder_2"]):
        mine, theirs = enc.state_dict(), ref[name].state_dict()
        if family == "sd2":  # penultimate layer: the last block is not loaded
            theirs = {k: v for k, v in theirs.items() if ".layers.2." not in k and "text_projection" not in k}
        _equal_state(mine, theirs)


def test_sdxl_conditioning_has_pooled_embeddings_and_zero_empty_prompt(tiny_sdxl):
    cond = open_model(tiny_sdxl).load_text_encoder().encode(["a cat", ""])
    assert cond.embeds.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert cond.embeds[1].abs().sum() == 0 and cond.embeds[0].abs().sum() > 0


def test_prediction_type_detection_and_override(tiny_sd2, tiny_sd1, tmp_path):
    assert open_model(tiny_sd2).family.prediction_type == "v_prediction"
    assert open_model(tiny_sd2, "epsilon").family.prediction_type == "epsilon"
    assert open_model(tiny_sd2, "epsilon").family.default_resolution == 512
    p = write_tiny_checkpoint(tmp_path / "v1.safetensors", "sd1", metadata={"modelspec.prediction_type": "v"})
    assert open_model(p).family.prediction_type == "v_prediction"
    with pytest.raises(UsageError):
        open_model(tiny_sd1, "x0")


def test_metadata_configs_override_shape_inference(tmp_path):
    p = write_tiny_checkpoint(tmp_path / "m.safetensors", "sd1", configs_in_metadata=True)
    ckpt = open_checkpoint(p)
    cfg = json.loads(ckpt.metadata["erase.model.unet"])
    cfg["attention_head_dim"] = 4  # not readable from weights: the metadata must win
    ckpt.metadata["erase.model.unet"] = json.dumps(cfg)
    from erase.checkpoint.model_config import unet_config

    assert unet_config(ckpt, detect_family(ckpt))["attention_head_dim"] == 4


def test_tokenizer_is_the_full_clip_vocabulary():
    tok = load_tokenizer("sd1")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert load_tokenizer("sd2").pad_token_id == 0  # OpenCLIP pads with "!"


def test_ema_weights_are_detected(tiny_sd1_fp16_ema):
    model = open_model(tiny_sd1_fp16_ema)
    assert model.family.has_ema
    assert model.ckpt.dtypes()["F16"] > 100


def test_ckpt_pickle_loads_through_weights_only(tmp_path, tiny_sd1):
    state = open_checkpoint(tiny_sd1).get_many(open_checkpoint(tiny_sd1).keys())
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, p)
    model = open_model(p)
    assert model.family.name == "sd1" and model.ckpt.format == "ckpt"
    _equal_state(model.load_unet().state_dict(), open_model(tiny_sd1).load_unet().state_dict())


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, p)
    with pytest.raises(EraseError, match="refused"):
        open_checkpoint(p)
    assert not marker.exists()


def test_diffusers_folder(tmp_path):
    comps = tiny_components("sd1")
    folder = tmp_path / "pipe"
    for name, comp in comps.items():
        comp.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    model = open_model(folder)
    assert model.family.name == "sd1" and model.ckpt.format == "diffusers"
    _equal_state(model.load_unet().state_dict(), comps["unet"].state_dict())


def test_a_sharded_unet_folder_loads_and_only_the_shard_holding_a_replaced_tensor_is_rewritten(tmp_path):
    """A diffusers folder whose UNet is in shards (save_pretrained's max_shard_size): read as one UNet; writing a
    replacement rewrites the shard that holds it, with the provenance an erased folder is then read with, and copies
    every other file byte for byte."""
    from erase.checkpoint.write import write_checkpoint

    comps = tiny_components("sd1")
    folder = tmp_path / "pipe"
    for name, comp in comps.items():
        comp.save_pretrained(folder / name, **({"max_shard_size": "100KB"} if name == "unet" else {}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert len(list((folder / "unet").glob("*.safetensors"))) > 2
    model = open_model(folder)
    _equal_state(model.load_unet().state_dict(), comps["unet"].state_dict())
    name = next(n for n in model.unet_param_names() if ".attn2.to_k." in n)
    value = torch.full(model.ckpt.shape("unet/" + name), 0.5)
    out = write_checkpoint(model.ckpt, tmp_path / "out", {"unet/" + name: value}, metadata={"erase.concepts": '["cat"]'})
    files = sorted(f.relative_to(folder) for f in folder.rglob("*") if f.is_file())
    changed = [f for f in files if (folder / f).read_bytes() != (out / f).read_bytes()]
    assert len(changed) == 1 and changed[0].parts[0] == "unet"
    erased = open_model(out)
    assert torch.equal(erased.ckpt.get("unet/" + name), value) and erased.ckpt.metadata == {"erase.concepts": '["cat"]'}


def _unsupported(tmp_path, state, match):
    p = tmp_path / "x.safetensors"
    save_file(state, str(p))
    with pytest.raises(EraseError, match=match):
        detect_family(open_checkpoint(p))


def test_unsupported_files_are_named(tmp_path, tiny_sd1):
    z = torch.zeros(1)
    _unsupported(tmp_path, {"lora_unet_down_blocks_0_attn2_to_k.lora_down.weight": z}, "LoRA")
    _unsupported(tmp_path, {"model.diffusion_model.joint_blocks.0.x.weight": z}, re.escape("unsupported: SD3 medium (Stability's layout)"))
    _unsupported(tmp_path, {"double_blocks.0.img_attn.qkv.weight": z}, re.escape("unsupported: FLUX.1-schnell (Black Forest Labs' layout)"))
    _unsupported(tmp_path, {"first_stage_model.encoder.conv_in.weight": z}, "VAE-only")
    state = open_checkpoint(tiny_sd1).get_many(open_checkpoint(tiny_sd1).keys())
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    _unsupported(tmp_path, state, "inpainting")


def _corrupt(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("case", ["random", "truncated", "lying", "empty"])
def test_bad_safetensors_give_one_clear_error(tmp_path, tiny_sd1, case):
    good = tiny_sd1.read_bytes()
    if case == "random":
        data = bytes(range(256)) * 10
    elif case == "truncated":
        data = good[: len(good) // 2]
    elif case == "empty":
        data = b""
    else:  # header claims a bigger tensor than the file holds
        n = struct.unpack("<Q", good[:8])[0]
        header = json.loads(good[8 : 8 + n])
        first = next(k for k in header if k != "__metadata__")
        header[first]["shape"] = [10**6]
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + good[8 + n :]
    with pytest.raises(EraseError):
        open_checkpoint(_corrupt(tmp_path, f"{case}.safetensors", data))


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(EraseError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(EraseError, match="model_index.json"):
        open_checkpoint(tmp_path)
