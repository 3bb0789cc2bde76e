"""`erase run --adversarial`: the inner attack finds a prompt prefix that brings the concept back on the current weights,
leaves the UNet's gradients alone, and the outer step trains on it; closed-form and CA refuse it."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from erase.cli import app
from erase.engine.adversarial import AdversarialConfig, SoftPrefixAttack
from erase.engine.params import frozen_copy, select_trainable
from erase.engine.sampling import EvalCounter, predict
from erase.methods.base import Draw
from erase.models import open_model

runner = CliRunner()


SHAPES_MODEL = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "shapes-sd.safetensors"


def test_inner_attack_brings_the_concept_back_and_raises_the_erasure_loss():
    """On the shapes model erased by UCE ("a red circle" reads as "a red"), a soft prefix found on the erased weights
    brings the circle's predictions back (measured: distance to the input model's 0.065 -> 0.010) and with them the
    erasure loss (0.010 -> 0.074): the prompts an erasure has not reached, which adversarial training then trains on."""
    from erase.methods.uce import UCE, UCEConfig
    from erase.vocabulary import load_vocabulary

    model = open_model(SHAPES_MODEL)
    unet = model.load_unet()
    params = select_trainable(unet, "xattn")
    frozen = frozen_copy(dict(params))
    text = model.load_text_encoder()
    uce = UCE(UCEConfig(), ["circle"], preserve=[""], vocab=load_vocabulary("builtin:shapes"), tokenizer=text.tokenizers[0],
              encode=lambda prompts: text.encode(prompts).embeds)
    with torch.no_grad():
        for n, w in uce.solve({n: p.detach() for n, p in params.items() if UCE.edits(n)})[0].items():
            params[n].copy_(w)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 500])
    plain = text.encode(["a red circle"]).repeat(2)
    with torch.no_grad():
        target = predict(unet, z, t, text.encode(["a red"]).repeat(2), 32, weights=frozen)  # the erasure's target
        want = predict(unet, z, t, plain, 32, weights=frozen)  # the circle as the input model drew it
    counter = EvalCounter()
    attack = SoftPrefixAttack(AdversarialConfig(steps=10, lr=1e-2), model.load_text_encoder(), "circle", unet=unet, frozen=frozen,
                              resolution=32, device=torch.device("cpu"), dtype=torch.float32, counter=counter)
    with torch.no_grad():
        start = attack.conditioning("a red circle", 2)
    attacked = attack.attack(Draw(z, t, "a red circle", target), plain)

    def distance(cond, to):
        with torch.no_grad():
            return F.mse_loss(predict(unet, z, t, cond, 32), to).item()

    assert distance(attacked, want) < 0.3 * distance(start, want)  # the prefix brings the circle back on these weights
    assert distance(attacked, target) > 3 * distance(start, target)  # ... where the erasure has work left to do
    assert distance(plain, target) < 0.1 * distance(start, target)  # the plain prompt itself is erased
    assert attack.last["attack_loss_last"] < attack.last["attack_loss_first"]
    assert all(p.grad is None for p in unet.parameters())  # only the prefix moved: the UNet's gradients are the outer step's
    assert counter.total == 2 + 10 * 3 * 2  # the target's forward, then a forward and a backward per inner step (batch 2)


def test_adversarial_training_runs_the_inner_attack_every_step_and_records_it(tiny_sd1, tmp_path):
    args = ["run", str(tiny_sd1), "-c", "cat", "--steps", "2", "--sample-steps", "4", "--resolution", "16", "--preserve", "dog"]
    plain = runner.invoke(app, [*args, "--no-adversarial", "-o", str(tmp_path / "a.safetensors"), "--json"])
    robust = runner.invoke(app, [*args, "--adversarial", "--adversarial-steps", "3", "-o", str(tmp_path / "b.safetensors"), "--json"])
    assert plain.exit_code == 0 and robust.exit_code == 0, robust.output
    a, b = json.loads(plain.stdout), json.loads(robust.stdout)
    assert b["config"]["adversarial"] == {"steps": 3, "lr": 1e-2, "tokens": 1} and a["config"]["adversarial"] is None
    # per step: the input model's prediction (1), 3 inner steps (forward + backward), the attacked prompt's forward + backward
    assert b["unet_evals_per_step"] - a["unet_evals_per_step"] == pytest.approx(1 + 3 * 3 + 3)
    assert a["output_sha256"] != b["output_sha256"]


@pytest.mark.parametrize("args, words", [
    (["--method", "uce", "--adversarial"], "--adversarial does not apply to --method uce"),
    (["--method", "ca", "--anchor", "dog", "--adversarial"], "--adversarial does not apply to --method ca"),
    (["--no-adversarial", "--adversarial-steps", "5"], "not with --no-adversarial"),
])
def test_adversarial_is_refused_where_it_cannot_work(tiny_sd1, tmp_path, args, words):
    r = runner.invoke(app, ["run", str(tiny_sd1), "-c", "cat", *args, "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 2 and words in r.output, r.output
    assert not (tmp_path / "o.safetensors").exists()
