"""`erase generate`: determinism, PNG parameters, compare grids, SLD, prompt files, deltas."""

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erase.cli import app
from erase.generate import SLD_PRESETS, GenSettings, ImageGenerator, Job, SLDConfig, sld_guidance
from erase.models import open_model
from erase.prompts import load_prompts

runner = CliRunner()
FAST = ["--steps", "2", "--size", "32", "--device", "cpu"]


def _gen(path, *args):
    r = runner.invoke(app, ["generate", str(path), *FAST, *args])
    assert r.exit_code == 0, r.output
    return r


def test_same_seed_same_bytes_different_seed_differs(tiny_sd1, tmp_path):
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        _gen(tiny_sd1, "--prompt", "a cat", "--seed", seed, "--out", str(tmp_path / name))
    a, b, c = (next((tmp_path / n / "sd1").glob("*.png")).read_bytes() for n in "abc")
    assert a == b and a != c


def test_png_carries_a1111_parameters(tiny_sd1, tmp_path):
    _gen(tiny_sd1, "--prompt", "a red circle", "--negative", "blurry", "--seed", "7", "--guidance", "5", "--out", str(tmp_path))
    text = Image.open(next((tmp_path / "sd1").glob("*.png"))).text["parameters"]
    first, neg, fields = text.split("\n")
    assert first == "a red circle" and neg == "Negative prompt: blurry"
    for part in ("Steps: 2", "Sampler: DDIM", "CFG scale: 5", "Seed: 7", "Size: 32x32", "Model: sd1", "Model hash: "):
        assert part in fields


def test_compare_writes_one_tile_per_model(tiny_sd1, tiny_dir, tmp_path):
    from erase.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tiny_dir / "other.safetensors", "sd1", seed=1)
    _gen(tiny_sd1, "--compare", str(other), "--prompt", "a cat", "--prompt", "a dog", "--out", str(tmp_path))
    grids = sorted(tmp_path.glob("grid-*.png"))
    assert len(grids) == 2 and (tmp_path / "index.html").exists()
    assert Image.open(grids[0]).width == 2 * 128  # one 128-px tile per model


def test_sld_presets_are_the_papers():
    assert SLD_PRESETS["sld-weak"] == SLDConfig(15, 200.0, 0.0, 0.0, 0.0)
    assert SLD_PRESETS["sld-medium"] == SLDConfig(10, 1000.0, 0.01, 0.3, 0.4)
    assert SLD_PRESETS["sld-strong"] == SLDConfig(7, 2000.0, 0.025, 0.5, 0.7)
    assert SLD_PRESETS["sld-max"] == SLDConfig(0, 5000.0, 1.0, 0.5, 0.7)


def test_sld_update_is_plain_cfg_before_warmup():
    g = torch.Generator().manual_seed(0)
    e_u, e_p, e_s = (torch.randn(1, 4, 2, 2, generator=g) for _ in range(3))
    cfg = e_u + 7.5 * (e_p - e_u)
    sld = SLDConfig(warmup=2, scale=1000.0, threshold=0.01, momentum=0.3, beta=0.4)
    state = {}
    assert torch.equal(sld_guidance(e_u, e_p, e_s, 7.5, 0, sld, state), cfg)
    assert torch.equal(sld_guidance(e_u, e_p, e_s, 7.5, 1, sld, state), cfg)
    assert not torch.allclose(sld_guidance(e_u, e_p, e_s, 7.5, 2, sld, state), cfg)
    assert torch.equal(sld_guidance(e_u, e_p, None, 7.5, 5, None, {}), cfg)


def _latents(path, **kw):
    gen = ImageGenerator(open_model(path), GenSettings(steps=3, size=32, device="cpu", **kw))
    return gen.latents([Job("a cat", 1, 7.5)])


def test_sld_changes_images_only_after_warmup(tiny_sd1):
    plain = _latents(tiny_sd1)
    assert torch.equal(_latents(tiny_sd1, sld=SLDConfig(3, 5000.0, 1.0, 0.5, 0.7)), plain)  # warm-up covers every step
    assert not torch.equal(_latents(tiny_sd1, safety="sld-max", safety_concept="cat"), plain)


def test_csv_seed_and_guidance_columns_are_honoured(tiny_sd1, tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,categories,evaluation_seed,evaluation_guidance\n"a cat, sitting",sexual,11,4.5\nsome dog,violence,,\n')
    specs = load_prompts(csv)
    assert specs[0].prompt == "a cat, sitting" and specs[0].seed == 11 and specs[0].guidance == 4.5
    assert [s.prompt for s in load_prompts(csv, category="violence")] == ["some dog"]
    _gen(tiny_sd1, "--prompts", str(csv), "--out", str(tmp_path / "o"))
    names = sorted(p.name for p in (tmp_path / "o" / "sd1").glob("*.png"))
    assert names[0].endswith("-s11.png")
    assert "CFG scale: 4.5" in Image.open(tmp_path / "o" / "sd1" / names[0]).text["parameters"]


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--size", "30"], "multiple of 8"),
    (["--prompts", "nope.txt"], "does not exist"),
    (["--prompts", "builtin:nope"], "unknown prompt set"),
])
def test_generate_usage_errors(tiny_sd1, tmp_path, args, message):
    r = runner.invoke(app, ["generate", str(tiny_sd1), "--out", str(tmp_path), *args])
    assert r.exit_code == 2 and message in r.output


def test_empty_prompt_file_and_missing_column(tiny_sd1, tmp_path):
    empty, bad = tmp_path / "e.txt", tmp_path / "b.csv"
    empty.write_text("\n\n")
    bad.write_text("text\nhello\n")
    assert "no prompts" in runner.invoke(app, ["generate", str(tiny_sd1), "--prompts", str(empty)]).output
    r = runner.invoke(app, ["generate", str(tiny_sd1), "--prompts", str(bad)])
    assert r.exit_code == 2 and "prompt" in r.output


def test_delta_in_memory_equals_merged_file(tiny_sd1, tmp_path):
    from rich.console import Console

    from erase.engine.trainer import TrainConfig
    from erase.run import RunOptions, erase_concepts

    out, delta = tmp_path / "o.safetensors", tmp_path / "d.safetensors"
    erase_concepts(RunOptions(model=tiny_sd1, concepts=["cat"], out=out, delta=delta, train=TrainConfig(steps=2, lr=1e-2), preserve="none",
                              method_config={"sample_steps": 3}, resolution=32, device="cpu"), Console(quiet=True), progress=False)
    settings = GenSettings(steps=3, size=32, device="cpu")
    merged = ImageGenerator(open_model(out), settings).latents([Job("a cat", 1, 7.5)])
    in_memory = ImageGenerator(open_model(tiny_sd1), settings, delta=delta).latents([Job("a cat", 1, 7.5)])
    base = ImageGenerator(open_model(tiny_sd1), settings).latents([Job("a cat", 1, 7.5)])
    assert torch.allclose(merged, in_memory, atol=1e-5)
    assert not torch.allclose(base, merged, atol=1e-5)


def test_compare_holds_one_model_at_a_time_and_applies_delta_to_model_only(tiny_sd1, tmp_path, monkeypatch):
    import gc
    import weakref

    from rich.console import Console

    import erase.generate as generate
    from erase.engine.trainer import TrainConfig
    from erase.run import RunOptions, erase_concepts

    out, delta = tmp_path / "o.safetensors", tmp_path / "d.safetensors"
    erase_concepts(RunOptions(model=tiny_sd1, concepts=["cat"], out=out, delta=delta, train=TrainConfig(steps=2, lr=1e-2), preserve="none",
                              method_config={"sample_steps": 3}, resolution=32, device="cpu"), Console(quiet=True), progress=False)
    alive, deltas = [], []
    real_init = generate.ImageGenerator.__init__

    def init(self, model, settings, *, delta=None):
        gc.collect()
        assert all(ref() is None for ref in alive), "the previous model is still in memory"
        alive.append(weakref.ref(self))
        deltas.append(delta)
        real_init(self, model, settings, delta=delta)

    monkeypatch.setattr(generate.ImageGenerator, "__init__", init)
    _gen(tiny_sd1, "--compare", str(tiny_sd1), "--delta", str(delta), "--prompt", "a cat", "--out", str(tmp_path / "g"))
    assert deltas == [delta, None]  # MODEL gets the delta, the compared model is drawn as it is
    first, second = (sorted((tmp_path / "g" / d).glob("*.png"))[0] for d in sorted(p.name for p in (tmp_path / "g").iterdir() if p.is_dir()))
    assert first.read_bytes() != second.read_bytes()


def test_bf16_keeps_latents_in_fp32_between_steps(tiny_sd1):
    settings = GenSettings(steps=3, size=32, device="cpu", precision="bf16")
    x = ImageGenerator(open_model(tiny_sd1), settings).latents([Job("a cat", 1, 7.5)])
    assert x.dtype == torch.float32 and not torch.equal(x, x.to(torch.bfloat16).float())  # not bf16-rounded


@pytest.mark.parametrize("preset", ["sld-medium", "sld-max"])
def test_sld_denoises_as_diffusers_safe_pipeline_does(tiny_sd1, preset):
    """erase's SLD loop against diffusers' own StableDiffusionPipelineSafe: same components, same starting noise, the
    paper's hyper-parameters (warm-up shortened to 1 step so the safety term acts in a 3-step run); every latent equal.
    A sign error, a wrong threshold test or momentum order in the safety step would move them apart."""
    import dataclasses

    from diffusers import DDIMScheduler, StableDiffusionPipelineSafe

    from erase.generate import SLD_PRESETS, GenSettings, ImageGenerator, Job
    from erase.models import open_model

    sld = dataclasses.replace(SLD_PRESETS[preset], warmup=1)
    settings = GenSettings(steps=3, guidance=7.5, size=16, device="cpu", precision="fp32", sld=sld, safety_concept="a dog")
    gen = ImageGenerator(open_model(tiny_sd1), settings)
    ours = gen.latents([Job("a photo of a cat", 0, 7.5)])
    pipe = StableDiffusionPipelineSafe(vae=gen.vae, text_encoder=gen.text.encoders[0], tokenizer=gen.text.tokenizers[0], unet=gen.unet,
                                       scheduler=DDIMScheduler.from_config(gen.scheduler.config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.safety_concept = "a dog"
    noise = torch.randn((gen.unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(0))[None]  # as erase draws it
    seen = []
    pipe("a photo of a cat", height=16, width=16, num_inference_steps=3, guidance_scale=7.5, latents=noise.clone(),
         sld_warmup_steps=sld.warmup, sld_guidance_scale=sld.scale, sld_threshold=sld.threshold, sld_momentum_scale=sld.momentum,
         sld_mom_beta=sld.beta, callback=lambda i, t, latents: seen.append(latents.clone()), callback_steps=1)
    plain = ImageGenerator(open_model(tiny_sd1), dataclasses.replace(settings, sld=None)).latents([Job("a photo of a cat", 0, 7.5)])
    assert (ours - plain).abs().max() > 1e-4  # the safety term did act
    assert torch.allclose(ours, seen[-1], atol=1e-5, rtol=1e-4), (ours - seen[-1]).abs().max()


@pytest.mark.parametrize("sampler", ["dpm", "euler", "euler-a", "pndm", "unipc"])
def test_every_sampler_denoises_as_diffusers_pipeline_does(tiny_sd1, sampler):
    """Each sampler other than DDIM against diffusers' StableDiffusionPipeline with the same scheduler, components and
    starting noise (euler-a also draws its per-step noise from the same seeded generator): the final latents agree."""
    import dataclasses

    import diffusers

    from erase.generate import SCHEDULERS, GenSettings, ImageGenerator, Job
    from erase.models import open_model

    settings = GenSettings(steps=4, guidance=5.0, size=16, device="cpu", precision="fp32", scheduler=sampler)
    gen = ImageGenerator(open_model(tiny_sd1), settings)
    ours = gen.latents([Job("a photo of a cat", 3, 5.0)])
    cls_name, extra, _ = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, cls_name).from_config({**gen.model.scheduler("DDIMScheduler").config, **extra})
    pipe = diffusers.StableDiffusionPipeline(vae=gen.vae, text_encoder=gen.text.encoders[0], tokenizer=gen.text.tokenizers[0],
                                             unet=gen.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    noise = torch.randn((gen.unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(3))[None]
    theirs = pipe("a photo of a cat", height=16, width=16, num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (ours - theirs).abs().max()
    ddim = ImageGenerator(gen.model, dataclasses.replace(settings, scheduler="ddim")).latents([Job("a photo of a cat", 3, 5.0)])
    assert (ours - ddim).abs().max() > 1e-3  # the sampler is really another one
