"""Issue 38, "GPU day one": what a first CUDA run needs, checked where the CPU can show it (bf16 autocast runs the same
autocast code on the CPU; call order and arguments where only the GPU could show the effect)."""

import pytest
import torch
from typer.testing import CliRunner

from erase.cli import app

runner = CliRunner()


def test_tf32_is_switched_on_only_after_the_prompts_are_encoded(tiny_sd1, tmp_path, monkeypatch):
    """The preserved neighbours are chosen and the prompts encoded in true fp32; TF32 (GPUs, mixed precision) comes after."""
    from rich.console import Console

    import erase.run as run_module
    from erase.engine.trainer import TrainConfig
    from erase.models import TextEncoder

    events = []
    encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, *a, **k: (events.append("encode"), encode(self, *a, **k))[1])
    monkeypatch.setattr(run_module, "enable_fast_math", lambda device, dtype: events.append("tf32"))
    run_module.erase_concepts(run_module.RunOptions(model=tiny_sd1, concepts=["cat"], out=tmp_path / "o.safetensors", train=TrainConfig(steps=1),
                                                    method_config={"sample_steps": 2}, resolution=16, device="cpu", preserve="auto:1"),
                              Console(quiet=True), progress=False)
    assert events.count("tf32") == 1 and "encode" in events
    assert events.index("tf32") > max(i for i, e in enumerate(events) if e == "encode")


@pytest.mark.parametrize("command", ["generate", "evaluate", "attack"])
def test_xformers_is_offered_by_every_command_that_draws_and_refused_in_one_line_without_cuda(tiny_sd1, tmp_path, command):
    args = {"generate": ["generate", str(tiny_sd1), "--prompt", "a cat"],
            "evaluate": ["evaluate", str(tiny_sd1), "--prompts", "builtin:neutral", "--limit", "1"],
            "attack": ["attack", str(tiny_sd1), "--concept", "circle", "--base", str(tiny_sd1), "--limit", "1"]}[command]
    r = runner.invoke(app, [*args, "--xformers", "--device", "cpu", "--steps" if command != "attack" else "--sample-steps", "2",
                            "--size", "16", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--xformers needs a CUDA device" in r.output, r.output


def test_guidance_is_combined_in_fp32_under_bf16_autocast(tiny_sd1):
    from erase.engine.sampling import guided, predict
    from erase.models import open_model

    model = open_model(tiny_sd1)
    unet, text = model.load_unet(), model.load_text_encoder()
    uncond, cond = text.encode([""]), text.encode(["a cat"])
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = guided(unet, z, t, uncond, cond, 7.5, 16)
        both = predict(unet, torch.cat([z, z]), t, type(cond).cat([uncond, cond]), 16)
    assert both.dtype == torch.bfloat16 and out.dtype == torch.float32
    u, c = both.float().chunk(2)
    assert torch.equal(out, u + 7.5 * (c - u))  # the bf16 predictions' difference, taken in fp32
    assert not torch.equal(out, (both[:1] + 7.5 * (both[1:] - both[:1])).float())  # not the bf16 combination


def test_the_inner_attack_scales_its_fp16_loss_dynamically_and_skips_an_overflowing_step(tiny_sd1):
    """--adversarial under fp16: a non-finite scaled gradient leaves the prefix and its Adam state as they were and halves the
    scale (one overflow used to corrupt every later step); a finite one moves the prefix."""
    from erase.engine.adversarial import AdversarialConfig, SoftPrefixAttack
    from erase.engine.sampling import EvalCounter
    from erase.models import open_model

    model = open_model(tiny_sd1)
    attack = SoftPrefixAttack(AdversarialConfig(steps=1, lr=1e-2), model.load_text_encoder(), "cat", unet=None, frozen=None, resolution=16,
                              device=torch.device("cpu"), dtype=torch.float16, counter=EvalCounter())
    assert attack.scaler.is_enabled() and attack.scaler.get_scale() == 2.0 ** 12
    before = [v.detach().clone() for v in attack.vectors]
    attack._step(attack.vectors[0].sum() * float("inf"))
    assert all(torch.equal(v, b) for v, b in zip(attack.vectors, before)) and not attack.opt.state
    assert attack.scaler.get_scale() == 2.0 ** 11
    attack._step(attack.vectors[0].pow(2).sum())
    assert not torch.equal(attack.vectors[0], before[0])


def test_generate_encodes_every_prompt_of_a_run_in_one_pass_before_denoising(tiny_sd1, monkeypatch):
    """The text encoders can then leave the GPU for the whole denoising (they come back only for a prompt not yet seen)."""
    from erase.generate import GenSettings, ImageGenerator, Job
    from erase.models import TextEncoder, open_model

    calls = []
    encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, prompts, *a, **k: (calls.append(list(prompts)), encode(self, prompts, *a, **k))[1])
    gen = ImageGenerator(open_model(tiny_sd1), GenSettings(steps=2, size=16, batch=2, device="cpu"))
    gen.generate([Job(f"a cat {i}", i, 5.0) for i in range(5)])
    assert len(calls) == 1 and set(calls[0]) == {"", *(f"a cat {i}" for i in range(5))}


def test_a_run_that_cannot_fit_its_gpu_stops_before_loading_and_names_what_would_fit(tiny_sd1, tmp_path, monkeypatch):
    """The weights and training state are counted exactly from a meta-device UNet; over the free memory, one line that names
    the options that fit, before the UNet is loaded. When only the (estimated) activations tip it over: a warning."""
    from rich.console import Console

    import erase.run as run_module
    from erase.engine.memory import Plan, count_parameters, estimate
    from erase.engine.trainer import TrainConfig
    from erase.errors import EraseError
    from erase.models import Model, open_model

    unet_params, trainable = count_parameters(open_model(tiny_sd1), ("xattn", "xattn-kv", "full"))
    assert unet_params == sum(p.numel() for p in open_model(tiny_sd1).load_unet().parameters())
    plan = Plan(unet_params=unet_params, trainable=trainable, train_set="full", compute_bytes=4, ema=True, frozen_copy=True, text_params=0,
                family="sd1", latent_pixels=4, batch=1, gradient_checkpointing=False)
    need = estimate(plan)
    exact = need["total"] - need["activations"]
    loaded = []
    monkeypatch.setattr(Model, "load_unet", lambda self, *a, **k: loaded.append(1))
    options = dict(model=tiny_sd1, concepts=["cat"], out=tmp_path / "o.safetensors", train=TrainConfig(steps=1), train_set="full",
                   method_config={"sample_steps": 2}, resolution=16, device="cpu", preserve="auto:1",
                   adversarial=None)  # the plan above: no text encoder trained against
    monkeypatch.setattr(run_module, "free_memory", lambda device: int(exact * 0.8 / 0.9))
    with pytest.raises(EraseError, match=r"this run needs about .* MiB on cpu \(unet .*\), .* free; these would fit: --train xattn-kv"):
        run_module.erase_concepts(run_module.RunOptions(**options), Console(quiet=True), progress=False)
    assert not loaded and not (tmp_path / "o.safetensors").exists()
    # the exact part fits, the estimated activations do not: a warning, and the run goes on (to the UNet, stubbed here)
    monkeypatch.setattr(run_module, "free_memory", lambda device: int((exact + need["activations"] / 2) / 0.9))
    console = Console(record=True, width=300)
    with pytest.raises(Exception):
        run_module.erase_concepts(run_module.RunOptions(**options), console, progress=False)
    assert loaded and "activations are an estimate: going on" in console.export_text()


def test_gradients_are_averaged_in_small_buckets_without_a_copy_of_every_gradient(tmp_path):
    """The all-reduce goes bucket by bucket (here 16 bytes each: every tensor its own bucket, some split across none), and
    every gradient comes back divided by the world size. One gloo process stands in for the ranks: its all-reduce is the
    identity, so the result is each gradient / size."""
    import torch.distributed as dist

    from erase.engine import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        params = [torch.nn.Parameter(torch.ones(n)) for n in (3, 5, 1, 7)]
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, float(i + 1))
        params[2].grad = None  # a tensor no loss reached: zeros, reduced like the rest
        distributed.average_gradients(params, distributed.World(rank=0, size=2), bucket_bytes=16)
        assert [p.grad.tolist() for p in params] == [[0.5] * 3, [1.0] * 5, [0.0], [2.0] * 7]
    finally:
        dist.destroy_process_group()


def test_make_demo_measures_with_the_clis_thread_choice(monkeypatch, tmp_path):
    """examples/demo.py measures in its own process: it sets torch's threads as the CLI does (the cores free at start-up),
    not torch's default of every core."""
    import importlib.util
    import subprocess
    from pathlib import Path

    import erase.engine.threads as threads
    import erase.evaluate.shapes_world as shapes_world

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("demo_under_test", root / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    order = []
    monkeypatch.setattr(threads, "configure_threads", lambda requested=None: (order.append("threads"), (1, "test"))[1])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: order.append("erase run"))
    monkeypatch.setattr(shapes_world, "measure", lambda *a, **k: order.append("measure") or {})
    monkeypatch.setattr(demo, "write_outputs", lambda base, after: None)
    monkeypatch.setattr(demo, "ROOT", tmp_path)  # where the demo's printed paths are relative to
    monkeypatch.setattr(demo, "MODEL", tmp_path / "shapes-sd.safetensors")
    monkeypatch.setattr(demo, "OUT", tmp_path / "demo-out")
    demo.main()
    assert order[0] == "threads" and order.count("measure") == 2
