"""`erase merge`: task arithmetic on deltas, base checks, carry-over, LoRA export."""

import warnings

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from erase.checkpoint.formats import open_checkpoint
from erase.cli import app
from erase.engine.trainer import TrainConfig
from erase.errors import EraseError
from erase.lora import low_rank
from erase.merge import merge
from erase.run import RunOptions, erase_concepts
from erase.tiny import write_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def erasures(tiny_sd1, tmp_path_factory):
    d = tmp_path_factory.mktemp("erasures")
    for name, concept in (("a", "cat"), ("b", "dog")):
        erase_concepts(RunOptions(model=tiny_sd1, concepts=[concept], out=d / f"{name}.safetensors", delta=d / f"{name}.delta.safetensors",
                                  train=TrainConfig(steps=2, lr=1e-2), method_config={"sample_steps": 3}, resolution=32, device="cpu",
                                  preserve="none"),
                       Console(quiet=True), progress=False)
    return d


def _bytes(ckpt, name):
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def test_two_erasures_merge_to_base_plus_both_deltas(tiny_sd1, erasures, tmp_path):
    out = tmp_path / "m.safetensors"
    merge(tiny_sd1, [erasures / "a.safetensors", erasures / "b.safetensors"], out, base_path=tiny_sd1)
    base, a, b, m = (open_checkpoint(p) for p in (tiny_sd1, erasures / "a.safetensors", erasures / "b.safetensors", out))
    changed = 0
    for k in base.keys():
        if ".attn2." in k and k.startswith("model.diffusion_model."):
            want = base.get(k) + (a.get(k) - base.get(k)) + (b.get(k) - base.get(k))
            assert torch.allclose(m.get(k), want, atol=1e-6), k
            changed += not torch.equal(m.get(k), base.get(k))
        else:
            assert _bytes(base, k) == _bytes(m, k), k
    assert changed > 0 and set(eval(m.metadata["erase.concepts"])) == {"cat", "dog"}


def test_weights_scale_the_delta(tiny_sd1, erasures, tmp_path):
    out = tmp_path / "w.safetensors"
    merge(tiny_sd1, [erasures / "a.delta.safetensors"], out, weights=[0.5])
    base, delta, m = open_checkpoint(tiny_sd1), open_checkpoint(erasures / "a.delta.safetensors"), open_checkpoint(out)
    k = next(iter(delta.keys()))
    assert torch.allclose(m.get(k), base.get(k) + 0.5 * delta.get(k), atol=1e-6)


def test_merge_weights_option_weights_each_source_and_refuses_a_bad_list(tiny_sd1, erasures, tmp_path):
    """`erase merge --weights 0.5,-1`: OUT = base + 0.5 delta_a - delta_b on the changed tensors; a list that is not
    numbers, or not one per source, is one line and exit 2."""
    out = tmp_path / "cli.safetensors"
    sources = [str(erasures / "a.delta.safetensors"), str(erasures / "b.delta.safetensors")]
    r = runner.invoke(app, ["merge", str(tiny_sd1), *sources, "-o", str(out), "--weights", "0.5,-1"])
    assert r.exit_code == 0, r.output
    base, a, b, m = (open_checkpoint(p) for p in (tiny_sd1, *sources, out))
    k = next(k for k in a.keys() if not torch.equal(a.get(k), torch.zeros_like(a.get(k))))
    assert torch.allclose(m.get(k), base.get(k) + 0.5 * a.get(k) - b.get(k), atol=1e-6)
    assert not torch.allclose(m.get(k), base.get(k) + a.get(k) + b.get(k), atol=1e-6)
    for bad in ("half", "0.5"):  # not numbers; one weight for two sources
        r = runner.invoke(app, ["merge", str(tiny_sd1), *sources, "-o", str(tmp_path / "bad.safetensors"), "--weights", bad])
        assert r.exit_code == 2 and "--weights" in r.output and not (tmp_path / "bad.safetensors").exists(), (bad, r.output)


def test_base_mismatch_is_refused_unless_forced(tiny_sd1, erasures, tiny_dir, tmp_path):
    other = write_tiny_checkpoint(tiny_dir / "other_base.safetensors", "sd1", seed=5)
    with pytest.raises(EraseError, match="sha256"):
        merge(other, [erasures / "a.safetensors"], tmp_path / "x.safetensors", base_path=other)
    r = runner.invoke(app, ["merge", str(other), str(erasures / "a.safetensors"), "--base", str(other), "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "--force" in r.output


def test_carry_over_onto_a_modified_copy_of_the_base(tiny_sd1, erasures, tmp_path):
    ckpt = open_checkpoint(tiny_sd1)
    state = ckpt.get_many(ckpt.keys())
    state["model.diffusion_model.out.2.bias"] = state["model.diffusion_model.out.2.bias"] + 1  # a "fine-tune"
    from safetensors.torch import save_file

    tuned = tmp_path / "tuned.safetensors"
    save_file(state, str(tuned))
    result = merge(tuned, [erasures / "a.safetensors"], tmp_path / "t.safetensors", base_path=tiny_sd1)
    assert result["carried_onto_other_model"]
    base, a, t, out = (open_checkpoint(p) for p in (tiny_sd1, erasures / "a.safetensors", tuned, tmp_path / "t.safetensors"))
    k = next(k for k in base.keys() if ".attn2.to_k." in k)
    assert torch.allclose(out.get(k), t.get(k) + a.get(k) - base.get(k), atol=1e-6)
    assert torch.equal(out.get("model.diffusion_model.out.2.bias"), t.get("model.diffusion_model.out.2.bias"))


def test_lora_error_decreases_with_rank_and_vanishes_at_full_rank():
    d = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    errors = [low_rank(d, r)[2] for r in (1, 4, 8, 12)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6
    up, down, _ = low_rank(d, 12)
    assert torch.allclose(up @ down, d, atol=1e-5)
    up, down, err = low_rank(d, 20)  # more than the layer has: zero-padded to the one rank every layer shares
    assert up.shape == (16, 20) and down.shape == (20, 12) and err < 1e-6 and not up[:, 12:].any()


def test_lora_loads_in_diffusers_and_reproduces_the_delta(tiny_sd1, erasures, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from erase.models import open_model, write_config_folder

    lora = tmp_path / "l.safetensors"
    result = merge(tiny_sd1, [erasures / "a.delta.safetensors"], lora, lora_rank=64)  # >= every layer's rank: exact
    assert result["max_relative_error"] < 1e-4 and result["skipped_tensors"] > 0  # to_out biases
    model = open_model(tiny_sd1)
    pipe = StableDiffusionPipeline.from_single_file(str(tiny_sd1), config=str(write_config_folder(model, tmp_path / "cfg")),
                                                    local_files_only=True, safety_checker=None, requires_safety_checker=False)
    base_w = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's "alpha_pattern keys did not match" meant layers loaded at the wrong scale
        pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, restores plain parameter names
    delta = open_checkpoint(erasures / "a.delta.safetensors")
    fused = pipe.unet.state_dict()
    names = [n for n in fused if ".attn2." in n and n.endswith(".weight")]
    assert any(n.startswith("mid_block.") for n in names)  # the layers that came back at half their size before
    for name in names:
        assert torch.allclose(fused[name] - base_w[name], delta.get(model.unet_file_key(name)), atol=1e-5), name
