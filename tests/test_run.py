"""`erase run` and the SDD engine on tiny models (CPU, seconds)."""

import hashlib
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from erase.checkpoint.formats import open_checkpoint
from erase.cli import app
from erase.engine.adversarial import AdversarialConfig
from erase.engine.trainer import EMA, TrainConfig
from erase.errors import EraseError, UsageError
from erase.methods.sdd import SDD, SDDConfig
from erase.run import RunOptions, erase_concepts, parse_concepts

FAST = dict(method_config={"sample_steps": 4}, resolution=32, device="cpu", preserve="none")  # the reference SDD, fast


def _run(model, out, concepts=("nudity", "violence"), steps=2, quiet_console=None, **kw):
    from rich.console import Console

    opts = dict(FAST)
    opts.update(kw)
    train = opts.pop("train", TrainConfig(steps=steps))
    return erase_concepts(RunOptions(model=model, concepts=list(concepts), out=out, train=train, **opts),
                          quiet_console or Console(quiet=True), progress=False)


def _bytes(ckpt, name):
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def test_write_changes_only_attn2_tensors(tiny_sd1_fp16_ema, tmp_path):
    before = tiny_sd1_fp16_ema.read_bytes()
    report = _run(tiny_sd1_fp16_ema, tmp_path / "o.safetensors", steps=3, train=TrainConfig(steps=3, lr=1e-3))
    assert tiny_sd1_fp16_ema.read_bytes() == before  # input untouched
    src, out = open_checkpoint(tiny_sd1_fp16_ema), open_checkpoint(tmp_path / "o.safetensors")
    ema_scalars = {"model_ema.decay", "model_ema.num_updates"}
    # the un-erased EMA weights are dropped; LitEma's scalars are not weights and stay
    assert set(out.keys()) == {k for k in src.keys() if not k.startswith("model_ema.") or k in ema_scalars}
    assert all(_bytes(src, k) == _bytes(out, k) for k in ema_scalars)
    assert out.metadata["erase.dropped"].startswith(f"{len(src.keys()) - len(out.keys())} model_ema.* weight tensors")
    changed = {k for k in out.keys() if _bytes(src, k) != _bytes(out, k)}
    assert changed and all(".attn2." in k and k.startswith("model.diffusion_model.") for k in changed)
    assert json.loads(out.metadata["erase.concepts"]) == ["nudity", "violence"]
    assert out.metadata["erase.input_sha256"] == report["input_sha256"]
    assert out.metadata["modelspec.title"] == "tiny"


def test_report_has_documented_fields(tiny_sd1, tmp_path):
    report = _run(tiny_sd1, tmp_path / "o.safetensors")
    saved = json.loads((tmp_path / "o.report.json").read_text())
    for key in ("config", "versions", "family", "loss_curve", "wall_seconds", "unet_evals_per_step",
                "peak_memory", "input_sha256", "output_sha256", "trainable"):
        assert key in saved, key
    assert saved["config"]["device"] == "cpu" and saved["peak_memory"]["bytes"] > 0
    assert saved["output_sha256"] == report["output_sha256"] == hashlib.sha256((tmp_path / "o.safetensors").read_bytes()).hexdigest()
    # K = 4: teacher k ~ U{0..3} guided steps (2 evals each) + student cond, uncond, backward (4)
    assert 4 <= saved["unet_evals_per_step"] <= 4 + 2 * 3


def test_ema_update_matches_formula():
    p = {"w": torch.nn.Parameter(torch.tensor([1.0, 2.0]))}
    ema = EMA(p, 0.9)
    with torch.no_grad():
        p["w"].copy_(torch.tensor([3.0, 4.0]))
    ema.update()
    assert torch.allclose(ema.shadow["w"], 0.9 * torch.tensor([1.0, 2.0]) + 0.1 * torch.tensor([3.0, 4.0]))
    assert ema.teacher() is ema.shadow  # the teacher forward names the averaged weights
    assert torch.equal(p["w"].data, torch.tensor([3.0, 4.0]))  # the parameters themselves are untouched


def test_ema_at_decay_0_keeps_no_copy_and_is_the_parameters():
    p = {"w": torch.nn.Parameter(torch.tensor([1.0, 2.0]))}
    ema = EMA(p, 0.0)
    with torch.no_grad():
        p["w"].copy_(torch.tensor([3.0, 4.0]))
    ema.update()
    assert ema.teacher() is None  # the UNet's own parameters
    assert torch.equal(ema.shadow["w"], torch.tensor([3.0, 4.0])) and ema.shadow["w"].data_ptr() == p["w"].data_ptr()


def test_iterative_mode_cycles_student_prompt():
    sdd = SDD.__new__(SDD)
    sdd.pairs = SDD.student_pairs(SDDConfig(), ["a", "b", "c"])
    assert [sdd.student_prompt(s) for s in range(5)] == ["a", "b", "c", "a", "b"]
    assert {target for _, target in sdd.pairs} == {""}  # the reference: every concept against the empty prompt
    sdd.pairs = SDD.student_pairs(SDDConfig(concept_mode="composite"), ["a", "b", "c"])
    assert sdd.student_prompt(1) == "a, b, c"


def test_concepts_are_validated():
    assert parse_concepts(" nudity , violence ") == ["nudity", "violence"]
    for bad in ["", "  ", "a,,b", "a, "]:
        with pytest.raises(UsageError):
            parse_concepts(bad)


def test_loss_on_a_fixed_batch_decreases(tiny_sd1):
    from erase.engine.sampling import EvalCounter
    from erase.engine.trainer import Trainer
    from erase.models import open_model

    model = open_model(tiny_sd1)
    unet = model.load_unet()
    from erase.engine.params import select_trainable

    params = select_trainable(unet, "xattn")
    gen = torch.Generator().manual_seed(0)
    sdd = SDD(SDDConfig(sample_steps=4), ["cat"], unet=unet, scheduler=model.scheduler(), latent_shape=(1, 4, 8, 8),
              resolution=16, generator=gen, device=torch.device("cpu"), counter=EvalCounter())
    text = model.load_text_encoder()
    sdd.embeddings = {p: text.encode([p]) for p in sdd.prompts()}
    z = torch.randn(1, 4, 8, 8, generator=gen)
    sdd._harvest = lambda teacher, streams, prompt=None: [[(z.clone(), 1)] for _ in streams]  # always the same latent
    first = sdd.loss(0, None)[0].item()
    trainer = Trainer(TrainConfig(steps=30, lr=1e-3), sdd, params, generator=gen, device=torch.device("cpu"),
                      autocast_dtype=None, run_config={}, state_dir=None)
    trainer.train()
    last = sdd.loss(0, None)[0].item()
    assert last < 0.5 * first


@pytest.mark.parametrize("target", ["self", "frozen"])
def test_target_is_the_unconditional_prediction_of_the_chosen_weights(tiny_sd1, target):
    from erase.engine.params import select_trainable
    from erase.engine.sampling import EvalCounter, predict
    from erase.models import open_model

    model = open_model(tiny_sd1)
    unet, untouched = model.load_unet(), model.load_unet()
    params = select_trainable(unet, "xattn")
    gen = torch.Generator().manual_seed(0)
    sdd = SDD(SDDConfig(sample_steps=4, target=target), ["cat"], unet=unet, scheduler=model.scheduler(), latent_shape=(1, 4, 8, 8),
              resolution=16, generator=gen, device=torch.device("cpu"), counter=EvalCounter())
    text = model.load_text_encoder()
    sdd.embeddings = {p: text.encode([p]) for p in sdd.prompts()}
    with torch.no_grad():  # the student has moved away from the input model
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    moved = {n: p.detach().clone() for n, p in params.items()}
    z = torch.randn(1, 4, 8, 8, generator=gen)
    sdd.pending = [{"cat": [(z, 1)]}]  # stream 0, latents of the teacher prompt
    loss = sdd.loss(0, None)[0]
    t = sdd.scheduler.timesteps[1]
    with torch.no_grad():
        pred = predict(unet, z, t, sdd.embeddings["cat"], 16, EvalCounter())
        expected = {"self": predict(unet, z, t, sdd.embeddings[""], 16, EvalCounter()),
                    "frozen": predict(untouched, z, t, sdd.embeddings[""], 16, EvalCounter())}
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, expected[target]).item(), rel=1e-5)
    other = expected["frozen" if target == "self" else "self"]
    assert abs(loss.item() - torch.nn.functional.mse_loss(pred, other).item()) > 1e-3 * loss.item()
    assert all(torch.equal(p, moved[n]) for n, p in params.items())  # the student's weights are back in place


RESUMED = {  # name -> run options
    "self": dict(method_config={"sample_steps": 4, "reuse": 2, "target": "self"}),
    # a frozen target: a resumed run's target must be the input model, not the state it resumes
    "frozen": dict(method_config={"sample_steps": 4, "reuse": 2, "target": "frozen"}),
    # erase run's default (frozen target, expanded concepts, the retain term and its latent queues)
    "preserving": dict(method_config={"sample_steps": 4, "reuse": 2}, preserve="auto:2"),
    "esd": dict(method="esd", method_config={"sample_steps": 4, "reuse": 2}, preserve="dog"),
    # two sample streams per step: each stream's generator, queues and retain prompts come back from the state
    "batch 2": dict(method_config={"sample_steps": 4, "reuse": 2}, preserve="dog", batch_size=2),
    "esd batch 2": dict(method="esd", method_config={"sample_steps": 4, "reuse": 2}, preserve="dog", batch_size=2),
    # under bf16 autocast (the GPU default): the resumed run takes its precision from the state
    "bf16": dict(method_config={"sample_steps": 4, "reuse": 2}, preserve="dog", precision="bf16", resolution=16),
    # two concepts with an anchor each; the anchor samples must come back from the resume state, not be redrawn
    "ca": dict(method="ca", concepts=("circle", "star"), method_config={"anchor": "square, cross", "anchor_samples": 3, "sample_steps": 3}),
    # --adversarial: the soft prefix and its Adam state are warm-started from step to step, so they come back from the state
    "adversarial": dict(method_config={"sample_steps": 4, "reuse": 2}, preserve="none", adversarial=AdversarialConfig(steps=2, lr=1e-2)),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_is_bit_exact(tiny_sd1, tmp_path, monkeypatch, name):
    cfg = RESUMED[name]
    _run(tiny_sd1, tmp_path / "full.safetensors", train=TrainConfig(steps=4, lr=1e-3), **cfg)

    # interrupt after step 3 (Ctrl-C: mid-way through a reused trajectory), then resume to step 4
    import erase.engine.trainer as trainer_mod

    real_train = trainer_mod.Trainer.train

    def interrupted(self, on_step=None):
        def hook(p):
            if p.step == 3:
                raise KeyboardInterrupt
        return real_train(self, hook)

    monkeypatch.setattr(trainer_mod.Trainer, "train", interrupted)
    with pytest.raises(EraseError, match="resume"):
        _run(tiny_sd1, tmp_path / "part.safetensors", train=TrainConfig(steps=4, lr=1e-3), **cfg)
    assert not (tmp_path / "part.safetensors").exists()
    monkeypatch.setattr(trainer_mod.Trainer, "train", real_train)
    same = {k: cfg[k] for k in ("method", "concepts") if k in cfg}  # --batch-size too comes from the state  # what a resumed run must name again; the rest comes from the state
    resumed = _run(tiny_sd1, tmp_path / "part.safetensors", train=TrainConfig(steps=4), resume=tmp_path / "part.resume", **same)
    assert resumed["resumed_from_step"] == 3
    a, b = open_checkpoint(tmp_path / "full.safetensors"), open_checkpoint(tmp_path / "part.safetensors")
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k


def test_ctrl_c_during_a_step_finishes_the_step_then_saves_a_state_that_resumes_bit_exact(tiny_sd1, tmp_path, monkeypatch):
    """A real SIGINT in the middle of step 2's loss: the step completes, the state is saved at step 2 (no per-step snapshot
    to roll back), and resuming it gives the uninterrupted run's weights bit for bit. A second Ctrl-C mid-step stops at once
    and saves nothing."""
    import os
    import signal

    run = dict(train=TrainConfig(steps=3, lr=1e-3), method_config={"sample_steps": 4, "reuse": 2})
    _run(tiny_sd1, tmp_path / "full.safetensors", **run)
    real = SDD.loss

    def pressed(times):
        def loss(self, step, teacher):
            if step == 1:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
            return real(self, step, teacher)
        return loss

    monkeypatch.setattr(SDD, "loss", pressed(1))
    with pytest.raises(EraseError, match="interrupted at step 2/3; state saved"):
        _run(tiny_sd1, tmp_path / "part.safetensors", **run)
    monkeypatch.setattr(SDD, "loss", real)
    _run(tiny_sd1, tmp_path / "part.safetensors", train=TrainConfig(steps=3), resume=tmp_path / "part.resume")
    a, b = open_checkpoint(tmp_path / "full.safetensors"), open_checkpoint(tmp_path / "part.safetensors")
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    monkeypatch.setattr(SDD, "loss", pressed(2))
    with pytest.raises(EraseError, match="interrupted twice during step 2/3; nothing saved"):
        _run(tiny_sd1, tmp_path / "again.safetensors", **run)
    assert not (tmp_path / "again.resume").exists() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nan_loss_stops_without_output(tiny_sd1, tmp_path, monkeypatch):
    real = SDD.loss
    monkeypatch.setattr(SDD, "loss", lambda self, step, teacher: (real(self, step, teacher)[0] * float("nan"), {}))
    with pytest.raises(EraseError, match="nan"):
        _run(tiny_sd1, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


METHODS = {  # method -> (run options, what it trains)
    "sdd": (dict(), lambda k: ".attn2." in k),
    "esd": (dict(method="esd", train_set="noxattn", preserve="auto:1"), lambda k: ".attn2." not in k),  # ESD-u, preserving
    "ca": (dict(method="ca", method_config={"anchor": "dog", "anchor_samples": 2, "sample_steps": 2}, train_set="xattn-kv"),
           lambda k: ".attn2.to_k." in k or ".attn2.to_v." in k),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_run_two_steps(tiny_files, family, method, tmp_path):
    options, trained = METHODS[method]
    report = _run(tiny_files[family], tmp_path / "o.safetensors", concepts=["cat"], train=TrainConfig(steps=2, lr=1e-3), **options)
    assert report["steps"] == 2 and report["family"] == family and report["method"] == method
    out, src = open_checkpoint(tmp_path / "o.safetensors"), open_checkpoint(tiny_files[family])
    changed = [k for k in src.keys() if _bytes(src, k) != _bytes(out, k)]
    assert changed and all(k.startswith("model.diffusion_model.") and trained(k) for k in changed)


def test_delta_holds_only_changed_tensors(tiny_sd1, tmp_path):
    _run(tiny_sd1, tmp_path / "o.safetensors", delta=tmp_path / "d.safetensors", train=TrainConfig(steps=2, lr=1e-3))
    delta, src, out = open_checkpoint(tmp_path / "d.safetensors"), open_checkpoint(tiny_sd1), open_checkpoint(tmp_path / "o.safetensors")
    assert delta.metadata["erase.kind"] == "delta"
    assert all(".attn2." in k for k in delta.keys())
    k = next(iter(delta.keys()))
    assert torch.allclose(src.get(k) + delta.get(k), out.get(k), atol=1e-6)


runner = CliRunner()


def test_cli_run_end_to_end_with_config_file(tiny_sd1, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('concepts = ["nudity", "violence"]\nsteps = 2\nsample-steps = 3\nresolution = 32\ndevice = "cpu"\n')
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["run", str(tiny_sd1), "--config", str(cfg), "--steps", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["steps"] == 1  # the flag wins over the file
    assert report["config"]["method_config"]["sample_steps"] == 3
    assert (tmp_path / "o.report.json").exists()


@pytest.mark.parametrize("args,code,message", [
    (["--concepts", " , "], 2, "non-empty"),
    (["--concepts", "x", "--steps", "0"], 2, "--steps"),
    (["--concepts", "x", "--resolution", "30"], 2, "multiple of 8"),
    (["--concepts", "x", "--train", "text-kv"], 2, "text-kv is for SD3 / FLUX.1"),
    (["--concepts", "x", "--method", "uce", "--pooled"], 2, "--pooled is for SD3 / FLUX.1"),
])
def test_cli_run_usage_errors(tiny_sd1, args, code, message):
    r = runner.invoke(app, ["run", str(tiny_sd1), *args])
    assert r.exit_code == code and message in r.output


def test_concepts_file_takes_one_concept_per_line_commas_included(tiny_sd1, tmp_path):
    f = tmp_path / "concepts.txt"
    f.write_text("a man, shirtless\n\nviolence\n")
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["run", str(tiny_sd1), "--concepts", "cat", "--concepts-file", str(f), "--method", "uce", "--preserve", "none",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(open_checkpoint(out).metadata["erase.concepts"]) == ["cat", "a man, shirtless", "violence"]
    (tmp_path / "empty.txt").write_text("\n")
    r = runner.invoke(app, ["run", str(tiny_sd1), "--concepts-file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "e.safetensors")])
    assert r.exit_code == 2 and "names no concept" in r.output


def test_cli_run_refuses_to_overwrite(tiny_sd1, tmp_path):
    r = runner.invoke(app, ["run", str(tiny_sd1), "--concepts", "x", "--out", str(tiny_sd1)])
    assert r.exit_code == 2 and "input" in r.output
    existing = tmp_path / "e.safetensors"
    existing.write_bytes(b"keep")
    r = runner.invoke(app, ["run", str(tiny_sd1), "--concepts", "x", "--out", str(existing)])
    assert r.exit_code == 2 and "--force" in r.output and existing.read_bytes() == b"keep"


def test_cli_unknown_config_key_is_an_error(tiny_sd1, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("stepz = 3\n")
    r = runner.invoke(app, ["run", str(tiny_sd1), "--config", str(cfg)])
    assert r.exit_code == 2 and "stepz" in r.output


def test_long_concepts_warn_and_are_recorded(tiny_sd1, tmp_path):
    from rich.console import Console

    concept = " ".join(["graphic violence in a dark alley"] * 20)
    console = Console(record=True, width=200)
    report = _run(tiny_sd1, tmp_path / "o.safetensors", concepts=[concept], steps=1, quiet_console=console)
    printed = console.export_text()
    assert "warning:" in printed and "tokens: the text encoder reads the first 77" in printed
    assert list(report["truncated_prompts"]) == [concept] and report["truncated_prompts"][concept] > 77


def test_prompts_are_encoded_in_fp32_for_an_fp16_file(tiny_sd1_fp16_ema, tmp_path):
    from safetensors.torch import save_file

    from erase.models import open_model

    # the same (fp16-rounded) weights stored as fp32: encoding must not depend on the file's dtype
    ckpt = open_checkpoint(tiny_sd1_fp16_ema)
    upcast = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt.get_many(ckpt.keys()).items()}
    save_file(upcast, str(tmp_path / "fp32.safetensors"))
    half, full = open_model(tiny_sd1_fp16_ema).load_text_encoder(), open_model(tmp_path / "fp32.safetensors").load_text_encoder()
    assert all(p.dtype == torch.float32 for p in half.encoders[0].parameters())
    prompts = ["a cat", "nudity, violence", ""]
    assert torch.equal(half.encode(prompts).embeds, full.encode(prompts).embeds)


def test_default_run_erases_with_preservation(tiny_sd1, tmp_path):
    """Without preservation flags: the 5 concepts nearest the target (and "") held by the retain term, the input model's
    target, the concept in the vocabulary's prompts; only attn2 changes, and the report says what was held and why."""
    opts = {**FAST, "preserve": "auto"}
    report = erase_concepts(RunOptions(model=tiny_sd1, concepts=["cat"], out=tmp_path / "o.safetensors", train=TrainConfig(steps=3),
                                       **opts), Console(quiet=True), progress=False)
    held = report["preserve"]
    assert held["concepts"][0] == "" and len(held["concepts"]) == 6 and held["vocabulary"] == "general"
    assert [c for c, _ in held["auto_chosen"]["cat"]] == held["concepts"][1:] and "cat" not in held["concepts"]
    cfg = report["config"]
    assert cfg["method_config"]["target"] == "frozen" and cfg["method_config"]["expand"] and cfg["preserved_prompts"] == 1 + 5 * 8
    plain = _run(tiny_sd1, tmp_path / "p.safetensors", concepts=["cat"], steps=3)  # --preserve none
    assert report["unet_evals_per_step"] > plain["unet_evals_per_step"]  # the retain term's own latents and passes
    src, out = open_checkpoint(tiny_sd1), open_checkpoint(tmp_path / "o.safetensors")
    changed = {k for k in out.keys() if not torch.equal(src.get(k), out.get(k))}
    assert changed and all(".attn2." in k for k in changed)
    assert json.loads(out.metadata["erase.preserve"]) == held["concepts"]


def test_loss_terms_are_back_propagated_one_at_a_time_to_the_gradient_of_their_sum(tmp_path):
    # the retain term's prompts come as separate terms so that only one UNet graph is alive at a time
    from erase.engine.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x1, x2, w0 = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(1, 4, generator=g)

    def train(method_cls):
        lin = torch.nn.Linear(4, 1, bias=False)
        lin.weight.data.copy_(w0)
        method = method_cls(lin)
        Trainer(TrainConfig(steps=2, lr=0.1, ema_decay=0.0), method, dict(lin.named_parameters()), generator=torch.Generator(),
                device=torch.device("cpu"), autocast_dtype=None, run_config={}, state_dir=tmp_path).train()
        return lin.weight.detach(), method

    class Summed:
        def __init__(self, lin):
            self.lin = lin

        def loss(self, step, teacher):
            return self.lin(x1).pow(2).mean() + 2 * self.lin(x2).pow(2).mean(), {}

        def state_dict(self):
            return {}

    class Terms(Summed):
        seen_grad = None

        def terms(self, step, teacher):
            yield self.lin(x1).pow(2).mean()
            self.seen_grad = self.lin.weight.grad.clone()  # the first term was back-propagated before the second is built
            yield 2 * self.lin(x2).pow(2).mean()

    summed, _ = train(Summed)
    by_terms, method = train(Terms)
    assert method.seen_grad is not None and torch.allclose(by_terms, summed, atol=1e-6)


def test_a_crash_resumes_from_the_last_save_every_state(tiny_sd1, tmp_path, monkeypatch):
    """--save-every N keeps a resumable state every N steps, for the crash that is not a Ctrl-C (nothing saved then):
    resuming from it ends bit for bit where the uninterrupted run ends."""
    import erase.engine.trainer as trainer_mod

    cfg = dict(method_config={"sample_steps": 4, "reuse": 2}, preserve="dog")
    _run(tiny_sd1, tmp_path / "full.safetensors", train=TrainConfig(steps=5, lr=1e-3, save_every=2), **cfg)
    real_train = trainer_mod.Trainer.train

    def crashing(self, on_step=None):
        def hook(p):
            if p.step == 3:
                raise RuntimeError("the machine went away")
        return real_train(self, hook)

    monkeypatch.setattr(trainer_mod.Trainer, "train", crashing)
    with pytest.raises(RuntimeError):
        _run(tiny_sd1, tmp_path / "part.safetensors", train=TrainConfig(steps=5, lr=1e-3, save_every=2), **cfg)
    monkeypatch.setattr(trainer_mod.Trainer, "train", real_train)
    resumed = _run(tiny_sd1, tmp_path / "part.safetensors", train=TrainConfig(steps=5), resume=tmp_path / "part.resume")
    assert resumed["resumed_from_step"] == 2  # the last multiple of --save-every before the crash
    a, b = open_checkpoint(tmp_path / "full.safetensors"), open_checkpoint(tmp_path / "part.safetensors")
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k)), k
