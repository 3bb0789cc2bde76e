"""ESD (`erase run --method esd`): the target is the formula's, on the frozen input model; the CLI runs it."""

import json

import pytest
import torch
from typer.testing import CliRunner

from erase.checkpoint.formats import open_checkpoint
from erase.cli import app
from erase.engine.params import select_trainable
from erase.engine.sampling import EvalCounter, predict
from erase.methods.esd import ESD, ESDConfig
from erase.models import open_model

runner = CliRunner()


@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_target_is_negative_guidance_from_the_frozen_input_model(tiny_sd1, eta):
    model = open_model(tiny_sd1)
    unet, untouched = model.load_unet(), model.load_unet()
    params = select_trainable(unet, "xattn")
    gen = torch.Generator().manual_seed(0)
    esd = ESD(ESDConfig(eta=eta, sample_steps=4), ["cat"], unet=unet, scheduler=model.scheduler(), latent_shape=(1, 4, 8, 8),
              resolution=16, generator=gen, device=torch.device("cpu"), counter=EvalCounter())
    text = model.load_text_encoder()
    esd.embeddings = {p: text.encode([p]) for p in ESD.prompts_for(esd.cfg, ["cat"])}
    with torch.no_grad():  # the student has moved away from the input model
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    z = torch.randn(1, 4, 8, 8, generator=gen)
    esd.pending = [{"cat": [(z, 2)]}]  # stream 0
    loss = esd.loss(0, None)[0]
    t = esd.scheduler.timesteps[2]
    with torch.no_grad():
        e0 = predict(untouched, z, t, esd.embeddings[""], 16)
        ec = predict(untouched, z, t, esd.embeddings["cat"], 16)
        student = predict(unet, z, t, esd.embeddings["cat"], 16)
    target = e0 - eta * (ec - e0)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(student, target).item(), rel=1e-5)


def test_cli_esd_u_trains_everything_but_cross_attention(tiny_sd1, tmp_path):
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["run", str(tiny_sd1), "--method", "esd", "-c", "cat", "--train", "noxattn", "--preserve", "none", "--steps", "2",
                            "--lr", "1e-3", "--sample-steps", "3", "--resolution", "32", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    src, dst = open_checkpoint(tiny_sd1), open_checkpoint(out)
    changed = {k for k in dst.keys() if not torch.equal(src.get(k), dst.get(k))}
    assert changed and all(k.startswith("model.diffusion_model.") and ".attn2." not in k for k in changed)
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["method"] == "esd" and report["config"]["train"]["ema_decay"] == 0.0  # ESD's own default: no EMA
    assert runner.invoke(app, ["run", str(tiny_sd1), "--method", "esd", "-c", "cat", "--target", "frozen", "-o", str(tmp_path / "x.safetensors")]).exit_code == 2
