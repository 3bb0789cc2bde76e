"""Concept Ablation (`erase run --method ca`): the loss is the formula's, both variants; captions; the CLI runs it."""

import json

import pytest
import torch
from typer.testing import CliRunner

from erase.checkpoint.formats import open_checkpoint
from erase.cli import app
from erase.engine.params import select_trainable
from erase.engine.sampling import EvalCounter, predict
from erase.methods.ca import CA, CAConfig
from erase.models import open_model
from erase.vocabulary import Vocabulary

runner = CliRunner()


def test_captions_name_the_target_where_the_anchor_was():
    vocab = Vocabulary("t", [], ["{}", "a {colour} {}"], {"colour": ["red"]})
    pairs = CA.caption_pairs(CAConfig(anchor="square, cross"), ["circle", "star"], vocab)
    assert pairs == [("square", "circle"), ("cross", "star"), ("a red square", "a red circle"), ("a red cross", "a red star")]
    style = CA.caption_pairs(CAConfig(anchor="painting", concept_type="style"), ["van gogh"], vocab)
    assert style[1] == ("a red painting", "a red painting, in the style of van gogh")
    with pytest.raises(Exception, match="anchor"):
        CA.caption_pairs(CAConfig(anchor="a, b"), ["x", "y", "z"], vocab)


@pytest.mark.parametrize("variant", ["model", "noise"])
def test_loss_matches_the_formula(tiny_sd1, variant):
    model = open_model(tiny_sd1)
    unet = model.load_unet()
    select_trainable(unet, "xattn-kv")
    gen = torch.Generator().manual_seed(0)
    ca = CA(CAConfig(anchor="dog", variant=variant), ["cat"], unet=unet, scheduler=model.scheduler(), latent_shape=(1, 4, 8, 8),
            resolution=16, generator=gen, device=torch.device("cpu"), counter=EvalCounter())
    text = model.load_text_encoder()
    ca.embeddings = {p: text.encode([p]) for p in CA.prompts_for(ca.cfg, ["cat"])}
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ca.anchors = [(x0, 0)]  # a planted anchor sample for the caption pair ("dog", "cat")
    state = gen.get_state()
    loss = ca.loss(0, None)[0]
    gen.set_state(state)  # replay the draws: which anchor, t, eps
    torch.randint(1, (1,), generator=gen)
    t = torch.randint(ca.noise.num_train_timesteps, (1,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = ca.scheduler.alphas_cumprod[t]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        got = predict(unet, x_t, t, ca.embeddings["cat"], 16)
        want = predict(unet, x_t, t, ca.embeddings["dog"], 16) if variant == "model" else eps
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(got, want).item(), rel=1e-5)


def test_cli_ca_writes_a_drop_in_file_with_its_provenance(tiny_sd1, tmp_path):
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["run", str(tiny_sd1), "--method", "ca", "-c", "circle", "--anchor", "square", "--preserve", "none", "--steps", "2",
                            "--lr", "1e-3", "--anchor-samples", "2", "--sample-steps", "3", "--resolution", "32", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    src, dst = open_checkpoint(tiny_sd1), open_checkpoint(out)
    changed = {k for k in dst.keys() if not torch.equal(src.get(k), dst.get(k))}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)  # the authors' crossattn-kv
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["method"] == "ca" and report["config"]["method_config"]["anchor"] == "square"
    assert dst.metadata["erase.method"] == "ca" and report["config"]["train"]["ema_decay"] == 0.0
    r = runner.invoke(app, ["run", str(tiny_sd1), "--method", "ca", "-c", "circle", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "--anchor" in r.output


def test_anchor_prompts_file_gives_the_captions(tmp_path):
    captions = tmp_path / "anchors.txt"
    captions.write_text("a photo of a square\n\na square on a table\na drawing\n")
    pairs = CA.caption_pairs(CAConfig(anchor="square", anchor_prompts=str(captions)), ["circle"], None)
    assert pairs == [("a photo of a square", "a photo of a circle"), ("a square on a table", "a circle on a table")]  # lines naming the anchor


def test_prior_weight_adds_the_denoising_loss_on_anchor_samples(tiny_sd1):
    model = open_model(tiny_sd1)
    unet = model.load_unet()
    select_trainable(unet, "xattn-kv")
    gen = torch.Generator().manual_seed(0)
    ca = CA(CAConfig(anchor="dog", prior_weight=0.5), ["cat"], unet=unet, scheduler=model.scheduler(), latent_shape=(1, 4, 8, 8),
            resolution=16, generator=gen, device=torch.device("cpu"), counter=EvalCounter())
    text = model.load_text_encoder()
    ca.embeddings = {p: text.encode([p]) for p in CA.prompts_for(ca.cfg, ["cat"])}
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ca.anchors = [(x0, 0)]
    state = gen.get_state()
    loss = ca.loss(0, None)[0]
    gen.set_state(state)

    def noised():
        t = torch.randint(ca.noise.num_train_timesteps, (1,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ca.scheduler.alphas_cumprod[t]
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps

    torch.randint(1, (1,), generator=gen)
    x_t, t, _ = noised()
    torch.randint(1, (1,), generator=gen)
    xp, tp, eps_p = noised()
    with torch.no_grad():
        ablation = torch.nn.functional.mse_loss(predict(unet, x_t, t, ca.embeddings["cat"], 16), predict(unet, x_t, t, ca.embeddings["dog"], 16))
        prior = torch.nn.functional.mse_loss(predict(unet, xp, tp, ca.embeddings["dog"], 16), eps_p)  # the anchor caption denoises its sample
    assert loss.item() == pytest.approx(ablation.item() + 0.5 * prior.item(), rel=1e-5)


@pytest.mark.parametrize("concept_type", ["style", "nudity"])
def test_concept_type_sets_the_authors_lr_and_trained_set_unless_given(tiny_sd1, tmp_path, concept_type):
    from erase.methods.ca import PRESETS

    args = ["run", str(tiny_sd1), "--method", "ca", "-c", "cat", "--anchor", "dog", "--concept-type", concept_type, "--preserve", "none",
            "--steps", "1", "--anchor-samples", "1", "--sample-steps", "2", "--resolution", "16", "--device", "cpu"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "a.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["config"]["train"]["lr"] == PRESETS[concept_type]["lr"] and report["config"]["train"]["steps"] == 1  # --steps given
    assert report["config"]["train_set"] == PRESETS[concept_type]["train_set"]
    assert report["config"]["method_config"]["concept_type"] == concept_type
    r = runner.invoke(app, [*args, "--lr", "1e-3", "--train", "xattn", "-o", str(tmp_path / "b.safetensors"), "--json"])
    report = json.loads(r.stdout)
    assert report["config"]["train"]["lr"] == 1e-3 and report["config"]["train_set"] == "xattn"  # what the user gives wins


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler"])
def test_the_forward_process_noises_and_targets_by_the_models_prediction_type(scheduler, prediction_type):
    """erase.engine.noise (Concept Ablation, HFI's inversion and UnlearnDiffAtk train through it): z_t = sqrt(a) z0 +
    sqrt(1 - a) noise, and the target is the noise or v = sqrt(a) noise - sqrt(1 - a) z0, per sample's timestep."""
    import diffusers

    from erase.engine.noise import DiffusionNoise

    s = getattr(diffusers, scheduler)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    z0, noise, t = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([10, 900])
    z_t, target = DiffusionNoise(s).noised(z0, noise, t)
    a = s.alphas_cumprod.double()[t].view(2, 1, 1, 1)
    assert torch.allclose(z_t, a.sqrt() * z0 + (1 - a).sqrt() * noise)
    want = a.sqrt() * noise - (1 - a).sqrt() * z0 if prediction_type == "v_prediction" else noise
    assert torch.allclose(target, want)


def test_the_flow_matching_forward_process_is_diffusers_training_line_and_velocity():
    """SD3 / FLUX.1: z_t = (1 - s) z0 + s noise at diffusers' own (shifted) training sigmas, the model's timestep s * 1000,
    the velocity noise - z0 as target: one Euler step of the true velocity from z_t lands on z0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from erase.engine.noise import DiffusionNoise, FlowMatchNoise, forward_process

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
    noise_fn = forward_process(s)
    assert isinstance(noise_fn, FlowMatchNoise) and isinstance(forward_process(__import__("diffusers").DDIMScheduler()), DiffusionNoise)
    z0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    z_t, v = noise_fn.noised(z0, noise, t)
    timestep = noise_fn.timestep(t)
    assert torch.allclose(z_t, s.scale_noise(z0, timestep, noise), atol=1e-6)  # diffusers finds these among its training timesteps
    assert torch.equal(v, noise - z0) and timestep[0] < timestep[1]
    sigma = noise_fn.sigma(t).view(2, 1, 1, 1)
    assert torch.allclose(z_t - sigma * v, z0, atol=1e-5)
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    with pytest.raises(ValueError, match="mu"):
        FlowMatchNoise(flux)
    got = FlowMatchNoise(flux, mu=0.8).sigma(t)
    assert torch.allclose(got, flux.time_shift(0.8, 1.0, (t.double() + 1) / 1000).float())


def test_a_flow_models_loss_is_the_epsilon_loss_it_stands_for():
    """prediction_mse: for a flow model each sample's velocity error is weighted by (1 - s)^2 (eps = z_t + (1 - s) v), so
    the loss equals the MSE of the eps each velocity implies; for a DDPM model it is the plain MSE, bit for bit."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from erase.engine.noise import prediction_mse

    g = torch.Generator().manual_seed(0)
    z_t, v_a, v_b = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([250.0, 900.0])
    s = (t / 1000).view(2, 1, 1, 1)
    eps = lambda v: z_t + (1 - s) * v  # noqa: E731
    got = prediction_mse(v_a, v_b, t, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert torch.allclose(got, torch.nn.functional.mse_loss(eps(v_a), eps(v_b)), rtol=1e-5)
    assert torch.equal(prediction_mse(v_a, v_b, t, DDIMScheduler()), torch.nn.functional.mse_loss(v_a, v_b))
