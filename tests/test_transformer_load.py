"""SD3 / FLUX.1 single files load into diffusers' transformers with the configuration their tensors imply."""

import json

import pytest
import torch
from safetensors.torch import save_file

from erase.checkpoint.formats import open_checkpoint
from erase.checkpoint.transformer_config import flux_rope_axes, load_transformer, transformer_config
from erase.checkpoint.transformer_files import read_transformer_file
from erase.errors import EraseError
from tests.transformer_layouts import flux_model, flux_shapes, sd3_model, sd3_shapes, tensors

W, HEADS = 32, 2
CONFIG_KEYS = ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "in_channels")


def _file(tmp_path, shapes, metadata=None):
    path = tmp_path / "m.safetensors"
    save_file({k: t.float() for k, t in tensors(shapes).items()}, str(path), metadata=metadata)
    ckpt = open_checkpoint(path)
    return ckpt, read_transformer_file(ckpt)


def _inputs(family: str, g: torch.Generator) -> dict:
    if family == "sd3":
        return {"hidden_states": torch.randn(2, 16, 8, 8, generator=g), "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
                "pooled_projections": torch.randn(2, 48, generator=g), "timestep": torch.tensor([10.0, 500.0])}
    return {"hidden_states": torch.randn(2, 16, 64, generator=g), "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 48, generator=g), "timestep": torch.tensor([0.01, 0.5]),
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3),
            "txt_ids": torch.zeros(5, 3), "guidance": torch.tensor([3.5, 3.5])}


@pytest.mark.parametrize("release", ["sd35-medium", "flux-dev"])
def test_a_release_file_loads_into_the_transformer_diffusers_builds_from_the_same_weights(tmp_path, release):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    if release == "sd35-medium":
        shapes, reference, family = sd3_shapes(W, HEADS, 3, dual=(0, 1), text_encoders=("clip_l",), vae=True), sd3_model(W, HEADS, 3, dual=(0, 1)), "sd3"
    else:
        shapes, reference, family = flux_shapes(W, HEADS, 2, 2), flux_model(W, HEADS, 2, 2), "flux"
    ckpt, tf = _file(tmp_path, shapes)
    model, pieces = load_transformer(ckpt, tf)
    assert type(model) is type(reference)
    assert {k: model.config[k] for k in CONFIG_KEYS} == {k: reference.config[k] for k in CONFIG_KEYS}
    if family == "sd3":
        assert tuple(model.config.dual_attention_layers) == (0, 1) and model.config.qk_norm == "rms_norm"
        raw = {k[len(tf.prefix):]: ckpt.get(k) for k in tf.transformer}
        reference.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(raw))  # diffusers' own reading of the file
    else:
        # diffusers' FLUX.1 converter only reads the released width (the key map is checked against it there)
        assert model.config.guidance_embeds and tuple(model.config.axes_dims_rope) == tuple(reference.config.axes_dims_rope)
        reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = model(**_inputs(family, torch.Generator().manual_seed(0))).sample
        want = reference.eval()(**_inputs(family, torch.Generator().manual_seed(0))).sample
    assert torch.equal(got, want)
    assert {p.file for p in pieces} == set(tf.transformer)  # every tensor of the transformer has its place


def test_a_release_head_width_gives_the_released_rotary_axes_and_metadata_wins(tmp_path):
    assert flux_rope_axes(128) == (16, 56, 56) and sum(flux_rope_axes(16)) == 16 and all(a % 2 == 0 for a in flux_rope_axes(24))
    ckpt, tf = _file(tmp_path, sd3_shapes(W, HEADS, 2, qk_norm=False))  # SD3 without q/k norms: heads of 64 do not fit 32
    with pytest.raises(EraseError, match="attention_head_dim"):
        transformer_config(ckpt, tf)
    ckpt, tf = _file(tmp_path, sd3_shapes(W, HEADS, 2, qk_norm=False), metadata={"erase.model.transformer": '{"attention_head_dim": 16, "num_attention_heads": 2}'})
    cfg = transformer_config(ckpt, tf)
    assert cfg["attention_head_dim"] == 16 and cfg["qk_norm"] is None and cfg["dual_attention_layers"] == ()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_forward_packs_positions_and_scales_the_timestep_as_diffusers_pipelines_do(family):
    """erase.engine.sampling.predict on a transformer: a (B, C, H, W) latent in, the velocity of the same shape out, equal to
    what diffusers' pipelines feed the model (FLUX.1: packed 2x2 patches, position ids, timestep / 1000, guidance 3.5);
    with named weights the same as the model holding them."""
    from diffusers import FluxPipeline

    from erase.engine.sampling import EvalCounter, predict
    from erase.models import Conditioning

    torch.manual_seed(0)
    model = (sd3_model(W, HEADS, 2) if family == "sd3" else flux_model(W, HEADS, 1, 1)).eval()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 16, 8, 8, generator=g)
    cond = Conditioning(torch.randn(2, 5, 32, generator=g), torch.randn(2, 48, generator=g))
    t = torch.tensor([300.0, 800.0])
    counter = EvalCounter()
    with torch.no_grad():
        got = predict(model, z, t, cond, 64, counter)
        if family == "sd3":
            want = model(hidden_states=z, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled).sample
        else:
            packed = FluxPipeline._pack_latents(z, 2, 16, 8, 8)
            out = model(hidden_states=packed, timestep=t / 1000, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                        img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32), txt_ids=torch.zeros(5, 3),
                        guidance=torch.full((2,), 3.5)).sample
            want = FluxPipeline._unpack_latents(out, 64, 64, 8)  # a 64-pixel image, VAE factor 8: the 8x8 latent
        assert got.shape == z.shape and torch.allclose(got, want, atol=1e-6) and counter.total == 2
        other = {n: p + 0.01 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if "attn" in n}
        named = predict(model, z, t, cond, 64, weights=other)
        model.load_state_dict(other, strict=False)
        assert torch.allclose(named, predict(model, z, t, cond, 64), atol=1e-6) and not torch.allclose(named, got)


@pytest.mark.parametrize("release", ["sd35-medium", "flux-dev"])
def test_trainable_sets_name_the_text_stream_not_sd35s_image_attn2_nor_fluxs_shared_single_blocks(tmp_path, release):
    from erase.engine.params import select_trainable

    shapes = sd3_shapes(W, HEADS, 3, dual=(0, 1)) if release == "sd35-medium" else flux_shapes(W, HEADS, 2, 2)
    ckpt, tf = _file(tmp_path, shapes)
    model, _ = load_transformer(ckpt, tf)
    kv = select_trainable(model, "xattn-kv")
    assert kv and all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in kv)
    assert sum(p.numel() for p in kv.values()) == tf.text_kv_parameters  # the file's text-stream key and value rows
    text = select_trainable(model, "xattn")
    assert set(kv) < set(text) and any(".to_add_out." in n for n in text) and not any("attn2" in n or "single" in n for n in text)
    rest = select_trainable(model, "noxattn")
    assert not set(rest) & set(text) and len(rest) + len(text) == len(list(model.parameters()))
    routes = select_trainable(model, "text-kv")  # the keys and values, and the pooled vector's embedder (its first layer)
    assert set(routes) - set(kv) == {"time_text_embed.text_embedder.linear_1.weight", "time_text_embed.text_embedder.linear_1.bias"}
    if release == "sd35-medium":
        assert any(".attn2." in n for n in select_trainable(model, "attn"))  # SD3.5 medium's image-only attention is attention


def test_the_trajectory_sampler_takes_flow_matching_euler_steps_on_a_transformer():
    """erase.engine.sampling.ddim_trajectory with SD3's scheduler: each step is z <- z + (s_next - s) * guided velocity, the
    guidance combined as for epsilon (weights summing to one carry over to flow matching)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from erase.engine.sampling import ddim_trajectory, predict
    from erase.models import Conditioning

    torch.manual_seed(0)
    model = sd3_model(W, HEADS, 2).eval()
    g = torch.Generator().manual_seed(2)
    uncond, cond = (Conditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 48, generator=g)) for _ in range(2))
    z = torch.randn(1, 16, 8, 8, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    got = ddim_trajectory(model, scheduler, z, uncond, cond, scale=4.0, num_steps=4, keep=[0, 2, 3], resolution=64)
    scheduler.set_timesteps(4)
    sigmas, want = scheduler.sigmas, [z]
    with torch.no_grad():
        for i in range(3):
            v_u, v_c = (predict(model, want[-1], scheduler.timesteps[i], c, 64) for c in (uncond, cond))
            want.append(want[-1] + (sigmas[i + 1] - sigmas[i]) * (v_u + 4.0 * (v_c - v_u)))
    for i in (0, 2, 3):
        assert torch.allclose(got[i], want[i], atol=1e-5), i


@pytest.mark.parametrize("family, with_t5", [("sd3", True), ("sd3", False), ("flux", True)])
def test_prompts_are_encoded_as_diffusers_pipelines_encode_them(family, with_t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from erase.backbones.text import TransformerText
    from tests.transformer_layouts import text_encoders

    enc = text_encoders(family)
    t5 = enc["t5"] if with_t5 else (None, None)
    prompts = ["a red circle", "a photo of a dog", ""]
    text = TransformerText(family, enc["clip"], enc["t5"] if with_t5 else None, joint_dim=32, t5_length=12)
    got = text.encode(prompts)
    if family == "sd3":
        (tok_l, clip_l), (tok_g, clip_g) = enc["clip"]
        pipe = StableDiffusion3Pipeline(transformer=sd3_model(W, HEADS, 1), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                        text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                                        text_encoder_3=t5[1], tokenizer_3=t5[0])
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=12)
        assert got.embeds.shape == (3, 77 + 12, 32)
    else:
        (tok_l, clip_l), = enc["clip"]
        pipe = FluxPipeline(transformer=flux_model(W, HEADS, 1, 1), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                            text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=t5[1], tokenizer_2=t5[0])
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=12)
    assert torch.allclose(got.embeds, embeds.float(), atol=1e-6) and torch.allclose(got.pooled, pooled.float(), atol=1e-6)
    if family == "flux":
        with pytest.raises(EraseError, match="T5"):
            TransformerText("flux", enc["clip"], None, joint_dim=32)


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_the_text_encoders_an_sd3_file_carries_load_and_encode_as_the_originals(tmp_path, with_tokenizer):
    import json

    from erase.backbones.text import TransformerText, load_transformer_text
    from tests.transformer_layouts import text_encoders

    enc = text_encoders("sd3")
    shapes = sd3_shapes(W, HEADS, 2)
    weights = {k: t.float() for k, t in tensors(shapes).items()}
    for name, model in zip(("clip_l", "clip_g", "t5xxl"), [m for _, m in enc["clip"]] + [enc["t5"][1]]):
        weights.update({f"text_encoders.{name}.transformer.{k}": v.clone() for k, v in model.state_dict().items()
                        if k != "encoder.embed_tokens.weight"})  # T5's copy of `shared`: not in the release files
    heads = {n: json.dumps({"num_attention_heads": 2, "hidden_act": "quick_gelu"}) for n in ("erase.model.clip_l", "erase.model.clip_g")}
    path = tmp_path / "sd3.safetensors"
    save_file(weights, str(path), metadata=heads)
    ckpt = open_checkpoint(path)
    tf = read_transformer_file(ckpt)
    assert tf.text_encoders == ("clip_l", "clip_g", "t5xxl")
    tok = enc["clip"][0][0]
    loaded, notes = load_transformer_text(ckpt, tf, 32, clip_tokenizers=[tok, tok], t5_tokenizer=enc["t5"][0] if with_tokenizer else None,
                                          t5_length=12)
    original = TransformerText("sd3", enc["clip"], enc["t5"] if with_tokenizer else None, 32, 12)
    prompts = ["a red circle", ""]
    a, b = loaded.encode(prompts), original.encode(prompts)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.pooled, b.pooled)
    assert bool(notes) != with_tokenizer  # without a T5 tokenizer the user hears that T5 is not used
    bare, tf_bare = _file(tmp_path, sd3_shapes(W, HEADS, 2))
    with pytest.raises(EraseError, match="clip_l or clip_g.*--text-encoders"):
        load_transformer_text(bare, tf_bare, 32, clip_tokenizers=[tok, tok])


def _sd3_vae(scaling: float = 1.5305, shift: float = 0.0609):
    """A tiny 16-channel VAE without quant convs, scaled and shifted as SD3's (FLUX.1's: 0.3611, 0.1159)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[32, 64], layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                         use_post_quant_conv=False, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         scaling_factor=scaling, shift_factor=shift)


def _sd3_file_with_everything(tmp_path):
    """A tiny SD3.5 large-layout single file carrying CLIP-L, CLIP-G, T5 and a 16-channel VAE, as Stability's
    `sd3.5_large.safetensors` with its text encoders; returns the path and the original text encoders."""
    import json

    from erase.checkpoint.export import vae_to_ldm
    from tests.transformer_layouts import text_encoders

    enc = text_encoders("sd3")
    weights = {k: t.float() for k, t in tensors(sd3_shapes(W, HEADS, 2, pooled_dim=20)).items()}
    for name, model in zip(("clip_l", "clip_g", "t5xxl"), [m for _, m in enc["clip"]] + [enc["t5"][1]]):
        weights.update({f"text_encoders.{name}.transformer.{k}": v.clone() for k, v in model.state_dict().items()
                        if k != "encoder.embed_tokens.weight"})
    vae = _sd3_vae()
    weights.update({k: v.clone() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()})
    meta = {n: json.dumps({"num_attention_heads": 2, "hidden_act": "quick_gelu"}) for n in ("erase.model.clip_l", "erase.model.clip_g")}
    path = tmp_path / "sd35.safetensors"
    save_file(weights, str(path), metadata=meta)
    return path, enc


def test_generate_draws_with_an_sd3_file_what_diffusers_sd3_pipeline_draws(tmp_path):
    """`erase generate` on an SD3 single file: the transformer, CLIP-L / CLIP-G and VAE it carries, SD3's flow-matching
    Euler sampler with CFG, the VAE's scale and shift: the same image as StableDiffusion3Pipeline from the same weights."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image
    from typer.testing import CliRunner

    from erase.cli import app
    from erase.models import load_tokenizer
    from erase.transformer_model import open_any_model

    path, enc = _sd3_file_with_everything(tmp_path)
    r = CliRunner().invoke(app, ["generate", str(path), "-p", "a red circle", "--steps", "4", "--guidance", "5", "--seed", "3",
                                 "--device", "cpu", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "T5 is not used" in r.output  # no T5 tokenizer: the file's T5 stays out, and the user hears it
    png, = (tmp_path / "out").rglob("*.png")
    ours = np.asarray(Image.open(png)).astype(np.float64)
    model = open_any_model(path)
    assert model.default_resolution == 32 and ours.shape == (32, 32, 3)
    pipe = StableDiffusion3Pipeline(transformer=model.load_unet(), scheduler=model.scheduler(), vae=model.load_vae(),
                                    text_encoder=enc["clip"][0][1], tokenizer=load_tokenizer("sdxl", "tokenizer"),
                                    text_encoder_2=enc["clip"][1][1], tokenizer_2=load_tokenizer("sdxl", "tokenizer_2"),
                                    text_encoder_3=None, tokenizer_3=None)
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images[0] * 255
    assert np.abs(ours - theirs).max() <= 1.0  # the PNG's rounding


def test_generate_takes_the_text_encoders_and_vae_an_sd3_file_lacks_from_a_diffusers_folder(tmp_path):
    """A transformer-only SD3 file with `--text-encoders FOLDER`: CLIP-L, CLIP-G, T5 (with its tokenizer) and the VAE come
    from the folder, and the image is StableDiffusion3Pipeline's with all three encoders."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from PIL import Image
    from typer.testing import CliRunner

    from erase.cli import app
    from erase.models import load_tokenizer
    from tests.transformer_layouts import text_encoders

    path = tmp_path / "sd35.safetensors"
    save_file({k: t.float() for k, t in tensors(sd3_shapes(W, HEADS, 2, pooled_dim=20)).items()}, str(path))
    ckpt = open_checkpoint(path)
    transformer, _ = load_transformer(ckpt, read_transformer_file(ckpt))
    enc = text_encoders("sd3")
    vae = _sd3_vae()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=enc["clip"][0][1], tokenizer=load_tokenizer("sdxl", "tokenizer"),
                                    text_encoder_2=enc["clip"][1][1], tokenizer_2=load_tokenizer("sdxl", "tokenizer_2"),
                                    text_encoder_3=enc["t5"][1], tokenizer_3=enc["t5"][0])
    pipe.save_pretrained(tmp_path / "folder")
    r = CliRunner().invoke(app, ["generate", str(path), "--text-encoders", str(tmp_path / "folder"), "-p", "a red circle", "--steps", "3",
                                 "--guidance", "4", "--seed", "5", "--size", "32", "--device", "cpu", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    png, = (tmp_path / "out").rglob("*.png")
    theirs = pipe("a red circle", num_inference_steps=3, guidance_scale=4.0, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(5)).images[0] * 255
    assert np.abs(np.asarray(Image.open(png)).astype(np.float64) - theirs).max() <= 1.0
    bare = CliRunner().invoke(app, ["generate", str(path), "-p", "a cat", "-o", str(tmp_path / "o2")])
    assert bare.exit_code == 1 and "carries no clip_l or clip_g" in bare.output and "--text-encoders" in bare.output
    assert not (tmp_path / "o2").exists()  # refused before anything is written
    wrong = CliRunner().invoke(app, ["generate", str(path), "--text-encoders", str(tmp_path), "-p", "a cat", "-o", str(tmp_path / "o3")])
    assert wrong.exit_code == 2 and "model_index.json" in wrong.output


def test_generate_draws_with_a_flux_file_and_its_folder_what_diffusers_flux_pipeline_draws(tmp_path):
    """A FLUX.1-dev transformer file (Black Forest Labs' layout) with `--text-encoders` a diffusers FLUX.1 folder: one
    forward per step with the guidance scale as the model's input, sigmas shifted by the image's token count, the packed
    latents unpacked for the VAE: FluxPipeline's image. Without the folder: one line, nothing written."""
    import json

    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from PIL import Image
    from typer.testing import CliRunner

    from erase.cli import app
    from erase.transformer_model import FLUX_SCHEDULER
    from tests.transformer_layouts import text_encoders

    path = tmp_path / "flux1-dev.safetensors"
    save_file({k: t.float() for k, t in tensors(flux_shapes(W, HEADS, 1, 1, pooled_dim=16)).items()}, str(path))
    ckpt = open_checkpoint(path)
    transformer, _ = load_transformer(ckpt, read_transformer_file(ckpt))
    enc = text_encoders("flux")
    vae = _sd3_vae(0.3611, 0.1159)
    (tok, clip), = enc["clip"]
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER["dev"]), vae=vae,
                        text_encoder=clip, tokenizer=tok, text_encoder_2=enc["t5"][1], tokenizer_2=enc["t5"][0])
    pipe.save_pretrained(tmp_path / "folder")
    args = ["generate", str(path), "-p", "a red circle", "--steps", "3", "--guidance", "2.5", "--seed", "7", "--size", "32", "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--text-encoders", str(tmp_path / "folder"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    png, = (tmp_path / "out").rglob("*.png")
    theirs = pipe("a red circle", num_inference_steps=3, guidance_scale=2.5, height=32, width=32, output_type="np",
                  max_sequence_length=512, generator=torch.Generator().manual_seed(7)).images[0] * 255
    assert np.abs(np.asarray(Image.open(png)).astype(np.float64) - theirs).max() <= 1.0
    evaluated = CliRunner().invoke(app, ["evaluate", str(path), "--text-encoders", str(tmp_path / "folder"), "--prompts", "builtin:shapes",
                                         "--limit", "2", "--detector", "shapes", "--target", "circle", "--steps", "2", "--size", "32",
                                         "--device", "cpu", "-o", str(tmp_path / "eval"), "--json", str(tmp_path / "r.json")])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["erased"]["images"] == 2 and report["targets"] == ["circle"]  # the detector scored FLUX.1's images
    bare = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "bare")])
    assert bare.exit_code == 1 and "--text-encoders" in bare.output and not (tmp_path / "bare").exists()
    negative = CliRunner().invoke(app, [*args, "--negative", "blurry", "--text-encoders", str(tmp_path / "folder"), "-o", str(tmp_path / "n")])
    assert negative.exit_code == 2 and "--negative" in negative.output


def _flux_with_clip_towers(tmp_path):
    """A FLUX.1 transformer without a guidance embedder (schnell's layout, as erase's shapes-world model) and a diffusers
    folder that puts a CLIP tower in the sequence slot with a 16-token tokenizer (as that model's): (file, folder, pipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.models import load_tokenizer
    from erase.transformer_model import FLUX_SCHEDULER

    path = tmp_path / "flux1-schnell.safetensors"
    save_file({k: t.float() for k, t in tensors(flux_shapes(W, HEADS, 1, 1, guidance=False, joint_dim=16, pooled_dim=16)).items()}, str(path))
    ckpt = open_checkpoint(path)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=49408, projection_dim=16, max_position_embeddings=77)).eval()
    short = load_tokenizer("sd1")
    short.model_max_length = 16
    pipe = FluxPipeline(transformer=load_transformer(ckpt, read_transformer_file(ckpt))[0],
                        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER["schnell"]), vae=_sd3_vae(0.3611, 0.1159),
                        text_encoder=clip, tokenizer=load_tokenizer("sd1"), text_encoder_2=clip, tokenizer_2=short)
    pipe.save_pretrained(tmp_path / "folder")
    return path, tmp_path / "folder", pipe


def test_a_flux_file_without_guidance_embedder_draws_with_true_cfg_and_a_clip_sequence_tower_as_flux_pipeline(tmp_path):
    """A FLUX.1 transformer without a guidance embedder whose folder puts a CLIP tower in the sequence slot with a 16-token
    tokenizer: at --guidance above 1 two forwards a step, FluxPipeline's true CFG against the empty prompt at the
    tokenizer's 16 tokens; at 1, one forward as FluxPipeline samples schnell."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from erase.cli import app
    from erase.transformer_model import TransformerModel

    path, folder, pipe = _flux_with_clip_towers(tmp_path)
    ckpt = open_checkpoint(path)
    model = TransformerModel(ckpt, read_transformer_file(ckpt), folder)
    text = model.load_text_encoder()
    assert text.t5_length == 16 and type(text.t5[1]).__name__ == "CLIPTextModel"
    assert model.default_resolution == pipe.vae.config.sample_size  # FLUX.1's config has no size: its VAE's (the release's 1024)
    for guidance, theirs_kwargs in ((3.0, {"true_cfg_scale": 3.0, "negative_prompt": ""}), (1.0, {})):
        out = tmp_path / f"out{guidance:g}"
        r = CliRunner().invoke(app, ["generate", str(path), "-p", "a red circle", "--steps", "3", "--guidance", str(guidance), "--seed", "7",
                                     "--size", "32", "--device", "cpu", "--text-encoders", str(folder), "-o", str(out)])
        assert r.exit_code == 0, r.output
        png, = out.rglob("*.png")
        theirs = pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="np", max_sequence_length=16,
                      generator=torch.Generator().manual_seed(7), **theirs_kwargs).images[0] * 255
        assert np.abs(np.asarray(Image.open(png)).astype(np.float64) - theirs).max() <= 1.0
    # without --guidance such a model draws as FluxPipeline does by default: one forward a step (scale 1), not SD's CFG 7.5
    r = CliRunner().invoke(app, ["generate", str(path), "-p", "a red circle", "--steps", "3", "--seed", "7", "--size", "32", "--device",
                                 "cpu", "--text-encoders", str(folder), "-o", str(tmp_path / "default")])
    assert r.exit_code == 0, r.output
    png, = (tmp_path / "default").rglob("*.png")
    assert "CFG scale: 1," in Image.open(png).text["parameters"]
    assert Image.open(png).tobytes() == Image.open(next((tmp_path / "out1").rglob("*.png"))).tobytes()


def test_hfi_collects_inverts_and_erases_a_learned_token_on_a_flux_file_through_every_text_tower(tmp_path):
    """HFI on a FLUX.1 file with --text-encoders: collect draws and records the folder, invert learns the token through
    both towers (one vector each) on the flow's forward process with the collection's folder, and run erases the token
    from the file with the embedding loaded into both towers."""
    from typer.testing import CliRunner

    from erase.cli import app
    from erase.embeddings import load_embedding
    from erase.feedback.collect import read_collection
    from erase.feedback.labels import append

    path, folder, _ = _flux_with_clip_towers(tmp_path)
    coll = tmp_path / "coll"
    r = CliRunner().invoke(app, ["feedback", "collect", str(path), "--text-encoders", str(folder), "--concept", "cat", "--out", str(coll),
                                 "--n", "2", "-p", "a cat", "--steps", "2", "--size", "32", "--guidance", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    info, rows = read_collection(coll)
    assert info["text_encoders"] == str(folder)
    for row in rows:
        append(coll, {"labeller": "ann", "kind": "binary", "image": row["image"], "harmful": True})
    token = tmp_path / "tok.safetensors"
    r = CliRunner().invoke(app, ["feedback", "invert", str(coll), str(path), "--out", str(token), "--token", "<flagged>", "--steps", "2",
                                 "--lr", "0.05", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"--text-encoders{folder}" in "".join(r.output.split())  # the next command it suggests (as Rich wraps it)
    learned = load_embedding(token)
    assert [tuple(v.shape) for v in learned.vectors] == [(1, 16), (1, 16)]
    assert json.loads(token.with_name("tok.report.json").read_text())["relative_change_from_init"][0] > 0
    out = tmp_path / "erased.safetensors"
    r = CliRunner().invoke(app, ["run", str(path), "--text-encoders", str(folder), "--embedding", str(token), "--concepts", "<flagged>",
                                 "--method", "uce", "--preserve", "none", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "erased.report.json").read_text())["config"]["embeddings"][0]["token"] == "<flagged>"
    assert not torch.equal(open_checkpoint(path).get("txt_in.weight"), open_checkpoint(out).get("txt_in.weight"))


def test_both_attacks_run_on_a_flux_file_through_every_text_tower(tmp_path, monkeypatch):
    """`erase attack` on a FLUX.1 file with --text-encoders: UnlearnDiffAtk's prefix enters both towers (CLIP's words in
    each), CCE's token is learned through both (one vector set per tower) on the flow-matching forward process, and the
    report counts both; a real FLUX.1's T5 (its own vocabulary) reads the prefix as the CLIP words it currently is, while
    the prefix's gradient comes through CLIP-L's pooled vector."""
    import json

    from typer.testing import CliRunner

    from erase.attack.prefix import install_prefix
    from erase.backbones.text import TransformerText
    from erase.cli import app
    from erase.embeddings import load_embedding
    from erase.errors import UsageError
    from erase.evaluate import detectors
    from tests.test_attack import FAST, _prompts, _Stub
    from tests.transformer_layouts import text_encoders

    path, folder, _ = _flux_with_clip_towers(tmp_path)
    monkeypatch.setitem(detectors.DETECTORS, "shapes", _Stub)
    out = tmp_path / "a"
    r = CliRunner().invoke(app, ["attack", str(path), "--text-encoders", str(folder), "--concept", "cat", "--detector", "shapes",
                                 "--base", str(path), "--prompts", str(_prompts(tmp_path)), "--guidance", "3", *FAST, "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"unlearndiffatk", "cce", "any"} and report["cases_total"] == 2
    assert all(len(c["unlearndiffatk"]["prefix_ids"]) == 3 and "<cce-cat>" in c["cce"]["prompt"] for c in report["cases"])
    token = load_embedding(out / "cce" / "cce-cat.safetensors")
    assert [tuple(v.shape) for v in token.vectors] == [(1, 16), (1, 16)]  # CLIP-L's tower, then the sequence tower
    enc = text_encoders("flux")
    t5_text = TransformerText("flux", enc["clip"], enc["t5"], 16)
    prefix, prefix_text = install_prefix(t5_text, 3)
    cond = t5_text.forward([f"{prefix_text} a cat"])
    cond.pooled.sum().backward()
    assert prefix.dist.grad.abs().sum() > 0  # through CLIP-L
    words = enc["clip"][0][0].decode(prefix.ids()).strip()
    assert torch.allclose(cond.embeds, t5_text.encode([f"{words} a cat"]).embeds, atol=1e-4)  # T5 read the words (grad mode: other kernels)
    prefix.hard = [300, 301, 302]
    hard_words = enc["clip"][0][0].decode(prefix.hard).strip()
    assert torch.equal(t5_text.encode([f"{prefix_text} a cat"]).embeds, t5_text.encode([f"{hard_words} a cat"]).embeds)
    assert not torch.equal(t5_text.encode([f"{prefix_text} a cat"]).embeds, t5_text.encode(["a cat"]).embeds)
    with pytest.raises(UsageError, match="no CLIP text tower"):
        install_prefix(TransformerText("flux", [], enc["t5"], 16), 3)


def test_run_erases_on_an_sd3_file_by_training_the_text_streams_keys_and_values_spliced_into_their_qkv_rows(tmp_path):
    """`erase run` (SDD, the default; and CA) on an SD3 single file: the trained parameters are the joint blocks' text-stream
    keys and values (add_k_proj, add_v_proj), written back into rows width..3*width of each context block's fused qkv; every
    other tensor and row keeps its bytes; the output draws with `erase generate`."""
    from typer.testing import CliRunner

    from erase.cli import app

    path, _ = _sd3_file_with_everything(tmp_path)
    out = tmp_path / "erased.safetensors"
    r = CliRunner().invoke(app, ["run", str(path), "-c", "cat", "--preserve", "none", "--steps", "3", "--lr", "1e-2", "--sample-steps", "4",
                                 "--train", "xattn-kv", "--resolution", "32", "--device", "cpu", "-o", str(out),
                                 "--delta", str(tmp_path / "cat.delta.safetensors")])
    assert r.exit_code == 0, r.output
    src, dst = open_checkpoint(path), open_checkpoint(out)
    assert set(src.tensors) == set(dst.tensors)
    changed = {k for k in src.tensors if not torch.equal(src.get(k), dst.get(k))}
    assert changed and all(".context_block.attn.qkv." in k for k in changed)
    for k in changed:
        a, b = src.get(k), dst.get(k)
        assert torch.equal(a[:W], b[:W]) and not torch.equal(a[W:], b[W:])  # the queries' rows are the input's
    drawn = CliRunner().invoke(app, ["generate", str(out), "-p", "a cat", "--steps", "2", "--device", "cpu", "-o", str(tmp_path / "img")])
    assert drawn.exit_code == 0, drawn.output
    applied = CliRunner().invoke(app, ["generate", str(path), "--delta", str(tmp_path / "cat.delta.safetensors"), "-p", "a cat", "--steps", "2",
                                       "--device", "cpu", "-o", str(tmp_path / "img-delta")])
    assert applied.exit_code == 0, applied.output
    from PIL import Image

    same = [Image.open(next((tmp_path / f).rglob("*.png"))).tobytes() for f in ("img", "img-delta")]
    assert same[0] == same[1]  # the base with the delta in memory draws what the erased file draws
    delta = open_checkpoint(tmp_path / "cat.delta.safetensors")
    assert set(delta.tensors) == changed and all(torch.equal(src.get(k) + delta.get(k), dst.get(k)) for k in changed)  # fp32 here
    # Concept Ablation: its anchor samples from the family's Euler sampler, its loss on the flow's forward process
    ablated = CliRunner().invoke(app, ["run", str(path), "-c", "cat", "--method", "ca", "--anchor", "dog", "--anchor-samples", "2",
                                       "--sample-steps", "3", "--preserve", "none", "--steps", "2", "--lr", "1e-2", "--resolution", "32",
                                       "--device", "cpu", "-o", str(tmp_path / "ca.safetensors")])
    assert ablated.exit_code == 0, ablated.output
    moved = {k for k in src.tensors if not torch.equal(src.get(k), open_checkpoint(tmp_path / "ca.safetensors").get(k))}
    assert moved and all(k.endswith((".context_block.attn.qkv.weight", ".context_block.attn.qkv.bias")) for k in moved)
    # merge: a second erasure, both carried onto the base under the file's own (fused) tensor names
    other = tmp_path / "erased-dog.safetensors"
    r = CliRunner().invoke(app, ["run", str(path), "-c", "dog", "--preserve", "none", "--steps", "2", "--lr", "1e-2", "--sample-steps", "4",
                                 "--train", "xattn-kv", "--resolution", "32", "--device", "cpu", "-o", str(other)])
    assert r.exit_code == 0, r.output
    merged = tmp_path / "merged.safetensors"
    r = CliRunner().invoke(app, ["merge", str(path), str(out), str(other), "--base", str(path), "-o", str(merged)])
    assert r.exit_code == 0, r.output
    m, o = open_checkpoint(merged), open_checkpoint(other)
    for k in changed:
        assert torch.allclose(m.get(k), src.get(k) + (dst.get(k) - src.get(k)) + (o.get(k) - src.get(k)), atol=1e-6)
    # LoRA export in diffusers' layout: loaded by diffusers onto the base, the text-stream key and value weights are the erased
    # ones (full rank here: width 32); biases have no LoRA form and are reported
    lora_path = tmp_path / "l.safetensors"
    r = CliRunner().invoke(app, ["merge", str(path), str(out), "--base", str(path), "--lora-rank", str(W), "-o", str(lora_path), "--json"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    lora = load_file(str(lora_path))
    assert lora and all(k.startswith("transformer.transformer_blocks.") and (".attn.add_k_proj." in k or ".attn.add_v_proj." in k) for k in lora)
    base_model, _ = load_transformer(src, read_transformer_file(src))
    base_model.load_lora_adapter(lora, prefix="transformer", adapter_name="erase")
    base_model.fuse_lora()
    erased_model, _ = load_transformer(dst, read_transformer_file(dst))
    fused = dict(base_model.named_parameters())
    for n, p in erased_model.named_parameters():
        if n.endswith("weight") and (".add_k_proj." in n or ".add_v_proj." in n):
            assert torch.allclose(fused[n.replace(".weight", ".base_layer.weight")] if n.replace(".weight", ".base_layer.weight") in fused
                                  else fused[n], p, atol=1e-5), n


def _flux_dev_with_folder(tmp_path, double: int):
    """A FLUX.1-dev file (Black Forest Labs' layout) and a diffusers FLUX.1 folder beside it (tmp_path / "folder") with
    tiny CLIP-L and T5 towers, a VAE and dev's scheduler: the file's path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from erase.transformer_model import FLUX_SCHEDULER
    from tests.transformer_layouts import text_encoders

    path = tmp_path / "flux1-dev.safetensors"
    save_file({k: t.float() for k, t in tensors(flux_shapes(W, HEADS, double, 1, pooled_dim=16)).items()}, str(path))
    ckpt = open_checkpoint(path)
    enc = text_encoders("flux")
    (tok, clip), = enc["clip"]
    FluxPipeline(transformer=load_transformer(ckpt, read_transformer_file(ckpt))[0], vae=_sd3_vae(0.3611, 0.1159),
                 scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER["dev"]), text_encoder=clip, tokenizer=tok,
                 text_encoder_2=enc["t5"][1], tokenizer_2=enc["t5"][0]).save_pretrained(tmp_path / "folder")
    return path


def test_run_erases_on_a_flux_file_with_its_folder_training_the_text_streams_keys_and_values(tmp_path):
    """`erase run` on a FLUX.1-dev file with `--text-encoders`: the trajectories take the guidance scale as the model's
    input (one forward per step, no unconditional half); the double blocks' text-stream keys and values train and are
    spliced into rows width..3*width of each `txt_attn.qkv`; nothing else changes; the output draws."""
    from typer.testing import CliRunner

    from erase.cli import app

    path = _flux_dev_with_folder(tmp_path, double=2)
    ckpt = open_checkpoint(path)
    out = tmp_path / "erased.safetensors"
    r = CliRunner().invoke(app, ["run", str(path), "--text-encoders", str(tmp_path / "folder"), "-c", "cat", "--preserve", "none",
                                 "--steps", "3", "--lr", "1e-2", "--sample-steps", "4", "--train", "xattn-kv", "--resolution", "32",
                                 "--device", "cpu", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    changed = {k for k in ckpt.tensors if not torch.equal(ckpt.get(k), open_checkpoint(out).get(k))}
    assert changed and all(k.endswith((".txt_attn.qkv.weight", ".txt_attn.qkv.bias")) for k in changed)
    for k in changed:
        assert torch.equal(ckpt.get(k)[:W], open_checkpoint(out).get(k)[:W])  # the queries' rows are the input's
    drawn = CliRunner().invoke(app, ["generate", str(out), "--text-encoders", str(tmp_path / "folder"), "-p", "a cat", "--steps", "2",
                                     "--size", "32", "--device", "cpu", "-o", str(tmp_path / "img")])
    assert drawn.exit_code == 0, drawn.output
    bare = CliRunner().invoke(app, ["run", str(path), "-c", "cat", "-o", str(tmp_path / "bare.safetensors")])
    assert bare.exit_code == 1 and "--text-encoders" in bare.output and "VAE" not in bare.output  # training needs no VAE
    assert not (tmp_path / "bare.safetensors").exists()
    # the default under preservation: text-kv without the inner attack; asked for, its soft token is in CLIP's and T5's tables
    default = CliRunner().invoke(app, ["run", str(path), "--text-encoders", str(tmp_path / "folder"), "-c", "cat", "--preserve", "dog",
                                       "--no-expand", "--steps", "2", "--sample-steps", "4", "--resolution", "32", "--device", "cpu",
                                       "--adversarial", "-o", str(tmp_path / "default.safetensors")])
    assert default.exit_code == 0, default.output
    assert "guidance input 3.5 (guidance-distilled" in " ".join(default.output.split())  # not "CFG 3.0": no CFG is made
    report = json.loads((tmp_path / "default.report.json").read_text())
    assert report["config"]["train_set"] == "text-kv" and report["config"]["adversarial"]["steps"] == 0
    plain = CliRunner().invoke(app, ["run", str(path), "--text-encoders", str(tmp_path / "folder"), "-c", "cat", "--preserve", "dog",
                                     "--steps", "1", "--sample-steps", "4", "--resolution", "32", "--device", "cpu", "-o", str(tmp_path / "p.safetensors")])
    assert plain.exit_code == 0 and json.loads((tmp_path / "p.report.json").read_text())["config"]["adversarial"] is None
    changed = {k for k in ckpt.tensors if not torch.equal(ckpt.get(k), open_checkpoint(tmp_path / "default.safetensors").get(k))}
    assert "vector_in.in_layer.weight" in changed and all(k.endswith(".txt_attn.qkv.weight") or k.startswith("vector_in.in_layer.")
                                                          or k.endswith(".txt_attn.qkv.bias") for k in changed)


def test_uce_on_a_flux_file_edits_the_text_and_pooled_embedders_so_the_concept_enters_as_its_guide(tmp_path, monkeypatch):
    """UCE's closed form on FLUX.1: the one matrix that reads the text encoder's tokens as they are is the text embedder
    (`txt_in`, diffusers' context_embedder), and by default the pooled vector's embedder (`vector_in.in_layer`) gets
    its own; every other tensor keeps its bytes, and the concept's tokens and pooled vector now enter nearer where the
    guide prompt's went than before. Each prompt passes the text encoders once for both. `--no-pooled` edits the text
    embedder alone."""
    from typer.testing import CliRunner

    from erase.backbones.text import TransformerText
    from erase.cli import app
    from erase.transformer_model import TransformerModel
    from erase.vocabulary import token_span

    path = _flux_dev_with_folder(tmp_path, double=1)
    ckpt = open_checkpoint(path)
    out = tmp_path / "erased.safetensors"
    encoded, real = [], TransformerText.encode
    monkeypatch.setattr(TransformerText, "encode", lambda self, prompts, *a, **k: (encoded.extend(prompts), real(self, prompts, *a, **k))[1])
    r = CliRunner().invoke(app, ["run", str(path), "--text-encoders", str(tmp_path / "folder"), "-c", "cat", "--method", "uce",
                                 "--preserve", "dog", "--no-expand", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    with_pooled = sorted(encoded)
    erased = open_checkpoint(out)
    assert {k for k in ckpt.tensors if not torch.equal(ckpt.get(k), erased.get(k))} == {"txt_in.weight", "vector_in.in_layer.weight"}
    text = TransformerModel(ckpt, read_transformer_file(ckpt), tmp_path / "folder").load_text_encoder()
    assert token_span(text.tokenizers[0], "a cat", "cat")[0] == 1  # T5 has no BOS: "a" is position 0
    c, g = text.encode(["cat"]), text.encode([""])  # --no-expand: the concept itself, its guide the prompt without it
    start = token_span(text.tokenizers[0], "cat", "cat")[0]
    for key, x, y in (("txt_in.weight", c.embeds[0, start:], g.embeds[0, start:]), ("vector_in.in_layer.weight", c.pooled, g.pooled)):
        w, w_new = ckpt.get(key).float(), erased.get(key).float()
        before, after = ((x @ m.T - y @ w.T).norm() for m in (w, w_new))
        assert after < 0.5 * before, key
    encoded.clear()
    text_only = CliRunner().invoke(app, ["run", str(path), "--text-encoders", str(tmp_path / "folder"), "-c", "cat", "--method", "uce",
                                         "--preserve", "dog", "--no-expand", "--no-pooled", "--device", "cpu", "-o", str(tmp_path / "t.safetensors")])
    assert text_only.exit_code == 0, text_only.output
    assert with_pooled == sorted(encoded)  # the pooled vectors came with the token embeddings: no prompt encoded again
    edited = open_checkpoint(tmp_path / "t.safetensors")
    assert {k for k in ckpt.tensors if not torch.equal(ckpt.get(k), edited.get(k))} == {"txt_in.weight"}


def test_a_transformer_loads_in_the_compute_dtype_with_its_trained_subset_in_fp32_from_the_files_values(tmp_path):
    """bf16 frozen weights, the text stream's keys and values as fp32 masters taken from the file (not from a bf16 copy)."""
    from erase.engine.params import selects

    ckpt, tf = _file(tmp_path, sd3_shapes(W, HEADS, 2))
    model, _ = load_transformer(ckpt, tf, torch.bfloat16, fp32=lambda n: selects(n, "xattn-kv", True))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".add_k_proj." in n or ".add_v_proj." in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if not (".add_k_proj." in n or ".add_v_proj." in n)} == {torch.bfloat16}
    k = "transformer_blocks.0.attn.add_k_proj.weight"
    assert torch.equal(dict(model.named_parameters())[k], ckpt.get(tf.prefix + "joint_blocks.0.context_block.attn.qkv.weight")[W:2 * W])


def test_a_guidance_distilled_model_samples_with_one_forward_at_the_runs_single_guidance():
    """FLUX.1 in the trained methods' sampler: one forward on the prompt (no unconditional half), at the same guidance
    input as every other forward of the run, so the trajectory's own prediction is the one a target forward would make."""
    from erase.engine.sampling import EvalCounter, guided_parts, predict
    from erase.models import Conditioning

    torch.manual_seed(0)
    model = flux_model(W, HEADS, 1, 1).eval()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 16, 8, 8, generator=g)
    uncond, cond = (Conditioning(torch.randn(2, 5, 32, generator=g), torch.randn(2, 48, generator=g)) for _ in range(2))
    counter = EvalCounter()
    with torch.no_grad():
        guided, conditional = guided_parts(model, z, torch.tensor(500.0), uncond, cond, 7.0, 64, counter)
        alone = predict(model, z, torch.tensor(500.0), cond, 64)
    assert torch.equal(guided, conditional) and torch.allclose(conditional, alone, atol=1e-6) and counter.total == 2


def test_run_generate_and_merge_take_a_sharded_flux_diffusers_folder_and_write_one_diffusers_loads(tmp_path):
    """A diffusers FLUX.1 folder as the input itself (its transformer in shards, as the release ships it): `erase run`
    writes a folder in which only the shards holding the trained keys and values change, and only those tensors; every
    other component keeps its bytes; diffusers' FluxTransformer2DModel loads the output; generate draws from it, and
    merge carries the erasure onto the input as a folder again, onto the same model's single file (fused rows), and a
    single file's delta back onto the folder."""
    import hashlib

    from diffusers import FluxTransformer2DModel
    from typer.testing import CliRunner

    from erase.cli import app

    _flux_dev_with_folder(tmp_path, double=2)
    folder = tmp_path / "folder"
    FluxTransformer2DModel.from_pretrained(folder / "transformer").save_pretrained(folder / "transformer", max_shard_size="60KB")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    shards = sorted((folder / "transformer").glob("*.safetensors"))
    assert len(shards) > 2
    info = json.loads(CliRunner().invoke(app, ["inspect", str(folder), "--json"]).output)
    assert (info["layout"], info["family_label"]) == ("a diffusers folder", "FLUX.1-dev") and "--text-encoders" not in info["support"]
    out = tmp_path / "erased"
    r = CliRunner().invoke(app, ["run", str(folder), "-c", "cat", "--preserve", "none", "--steps", "2", "--lr", "1e-2",
                                 "--sample-steps", "4", "--train", "xattn-kv", "--resolution", "32", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    digest = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()  # noqa: E731
    files = sorted(f.relative_to(folder) for f in folder.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(out) for f in out.rglob("*") if f.is_file())
    changed = [f for f in files if digest(folder / f) != digest(out / f)]
    assert changed and all(f.parts[0] == "transformer" and f.suffix == ".safetensors" for f in changed)
    assert len(changed) < len(shards)  # the shards without a trained tensor are copied as they were
    before = FluxTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    after = FluxTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(".attn.add_k_proj." in n or ".attn.add_v_proj." in n for n in moved)
    drawn = CliRunner().invoke(app, ["generate", str(out), "-p", "a cat", "--steps", "2", "--size", "32", "--device", "cpu",
                                     "-o", str(tmp_path / "img")])
    assert drawn.exit_code == 0, drawn.output
    merged = CliRunner().invoke(app, ["merge", str(folder), str(out), "--base", str(folder), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "merged" / "transformer").state_dict()
    assert all(torch.allclose(again[n], after[n], atol=1e-6) for n in moved)
    # the folder's erasure carried onto the same model's single file (Black Forest Labs' fused layout) and back
    file = tmp_path / "flux1-dev.safetensors"
    onto_file = CliRunner().invoke(app, ["merge", str(file), str(out), "--base", str(folder), "-o", str(tmp_path / "f.safetensors")])
    assert onto_file.exit_code == 0, onto_file.output
    f_ckpt = open_checkpoint(tmp_path / "f.safetensors")
    carried = load_transformer(f_ckpt, read_transformer_file(f_ckpt))[0].state_dict()
    assert all(torch.allclose(carried[n], after[n], atol=1e-6) for n in before)
    delta = tmp_path / "f.delta.safetensors"
    r = CliRunner().invoke(app, ["run", str(file), "--text-encoders", str(folder), "-c", "cat", "--preserve", "none", "--steps", "1",
                                 "--sample-steps", "4", "--train", "xattn-kv", "--resolution", "32", "--device", "cpu",
                                 "-o", str(tmp_path / "e.safetensors"), "--delta", str(delta)])
    assert r.exit_code == 0, r.output
    back = CliRunner().invoke(app, ["merge", str(folder), str(delta), "-o", str(tmp_path / "back")])
    assert back.exit_code == 0, back.output
    e_ckpt = open_checkpoint(tmp_path / "e.safetensors")
    file_erased = load_transformer(e_ckpt, read_transformer_file(e_ckpt))[0].state_dict()
    in_folder = FluxTransformer2DModel.from_pretrained(tmp_path / "back" / "transformer").state_dict()
    assert all(torch.allclose(in_folder[n], file_erased[n], atol=1e-6) for n in before)


def test_every_model_class_gives_the_commands_the_same_interface(tmp_path, tiny_sd1):
    """The Stable Diffusion model and the SD3 / FLUX.1 transformer model both implement erase.backbones.interface: every
    member is there, and every method takes the interface's arguments by the same names."""
    import inspect

    from erase.backbones.interface import DenoiserModel, members
    from erase.transformer_model import open_any_model

    models = [open_any_model(tiny_sd1), open_any_model(_flux_dev_with_folder(tmp_path, 1), text_encoders=tmp_path / "folder")]
    for model in models:
        assert isinstance(model, DenoiserModel), type(model).__name__
        for name, spec in members().items():
            if callable(spec):
                theirs = inspect.signature(getattr(type(model), name)).parameters
                assert list(inspect.signature(spec).parameters) == list(theirs), (type(model).__name__, name)
    assert [m.transformer for m in models] == [False, True]


def test_both_attacks_run_on_a_flux_dev_file_whose_sequence_tower_is_t5(tmp_path, monkeypatch):
    """`erase attack` on a FLUX.1-dev file whose folder has a T5 tower: UnlearnDiffAtk's prefix is searched through CLIP-L
    and read by T5 as words (the report's adversarial prompt is plain text); both attacks noise on dev's forward process,
    its resolution-dependent shift fixed for the image size (it was refused: "needs the latent size's mu")."""
    import json

    from typer.testing import CliRunner

    from erase.cli import app
    from erase.evaluate import detectors
    from tests.test_attack import FAST, _prompts, _Stub

    path = _flux_dev_with_folder(tmp_path, 1)
    monkeypatch.setitem(detectors.DETECTORS, "shapes", _Stub)
    out = tmp_path / "a"
    r = CliRunner().invoke(app, ["attack", str(path), "--text-encoders", str(tmp_path / "folder"), "--concept", "cat", "--detector",
                                 "shapes", "--base", str(path), "--prompts", str(_prompts(tmp_path)), "--attack", "all",
                                 *FAST, "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == {"unlearndiffatk", "cce", "any"}
    assert len(report["cases"]) == 2 and all("<erase-adv" not in c["unlearndiffatk"]["adversarial_prompt"] for c in report["cases"])
