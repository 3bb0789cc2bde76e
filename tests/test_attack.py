"""`erase attack`: the simplex projection, the straight-through step, ASR counting, CCE on the shared inversion,
resume after Ctrl-C, bad input, and the attack breaking UCE's erasure on the shapes model."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from erase.attack.prefix import install_prefix, project_to_simplex, straight_through_one_hot
from erase.cli import app
from erase.evaluate import detectors

runner = CliRunner()
SHAPES_MODEL = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "shapes-sd.safetensors"
FAST = ["--sample-steps", "2", "--size", "16", "--device", "cpu", "--limit", "2", "--images", "2", "--steps", "4", "--eval-every", "2"]


def _simplex_by_bisection(v: torch.Tensor) -> torch.Tensor:
    """The projection from its KKT form, w = max(v - theta, 0) with sum w = 1, theta found by bisection."""
    lo, hi = v.min() - 1, v.max()
    for _ in range(200):
        theta = (lo + hi) / 2
        if (v - theta).clamp(min=0).sum() > 1:
            lo = theta
        else:
            hi = theta
    return (v - (lo + hi) / 2).clamp(min=0)


def test_simplex_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 50, generator=g, dtype=torch.float64) * torch.tensor([0.01, 0.1, 1, 3, 10, 100], dtype=torch.float64).view(-1, 1)
    w = project_to_simplex(v)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(6, dtype=torch.float64))
    for row, got in zip(v, w):
        assert torch.allclose(got, _simplex_by_bisection(row), atol=1e-9)
    on = torch.softmax(torch.randn(3, 20, generator=g, dtype=torch.float64), -1)
    assert torch.allclose(project_to_simplex(on), on)  # a point of the simplex stays where it is


def test_straight_through_forward_is_a_token_row_and_the_gradient_reaches_every_entry():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 8, generator=g)
    dist = torch.nn.Parameter(project_to_simplex(torch.rand(2, 30, generator=g)))
    e = straight_through_one_hot(dist) @ table
    assert torch.equal(e, table[dist.argmax(-1)])  # exactly the argmax tokens' rows
    upstream = torch.randn(2, 8, generator=g)
    (e * upstream).sum().backward()
    assert torch.allclose(dist.grad, upstream @ table.T)  # d/dp of (p E) . u = E u for every vocabulary entry


def test_prefix_tokens_encode_as_the_chosen_words(tiny_sd1):
    from erase.models import open_model

    text = open_model(tiny_sd1).load_text_encoder()
    plain = text.encode(["cat dog a photo"]).embeds
    prefix, prefix_text = install_prefix(text, 2)
    ids = text.tokenizers[0]("cat dog", add_special_tokens=False).input_ids
    prefix.hard = ids
    assert torch.allclose(text.encode([f"{prefix_text} a photo"]).embeds, plain, atol=1e-6)
    prefix.hard = None
    with torch.no_grad():
        prefix.dist.zero_()
        prefix.dist[0, ids[0]] = prefix.dist[1, ids[1]] = 1.0
    cond = text.forward([f"{prefix_text} a photo"]).embeds
    assert torch.allclose(cond, plain, atol=1e-6)
    cond.sum().backward()
    assert prefix.dist.grad is not None and prefix.dist.grad.abs().sum() > 0


def _report(pre, broke_uda, broke_cce):
    from erase.attack.runner import AttackOptions, _report
    from erase.generate import Job

    n = len(pre)
    done = {("pre", i): {"flagged": p, "image": "x", "unet_evals": 10} for i, p in enumerate(pre)}
    for i, b in enumerate(broke_uda):
        if b is not None:
            done[("unlearndiffatk", i)] = {"success": b, "unet_evals": 100, "seconds": 1.0}
    for i, b in enumerate(broke_cce):
        if b is not None:
            done[("cce", i)] = {"success": b, "unet_evals": 10}

    class Det:
        name, threshold, targets = "shapes", 0.5, ["circle"]

    opts = AttackOptions(erased=Path("e"), concept="circle", out=Path("o"), fail_above=0.5)
    return _report(opts, [Job("a circle", i, 5.0) for i in range(n)], done, Det(), "sha", None, 1.0, 3)


def test_asr_counts_pre_attack_successes_as_successes_of_every_attack():
    # 5 cases: case 0 is broken before any attack (so never attacked); UDA breaks 1 and 2; CCE breaks 2 and 3
    r = _report([True, False, False, False, False], [None, True, True, False, False], [None, False, True, True, False])
    assert r["pre_attack"]["successes"] == 1 and r["pre_attack"]["rate"] == pytest.approx(0.2)
    assert r["results"]["unlearndiffatk"]["successes"] == 3 and r["results"]["unlearndiffatk"]["broken_by_attack"] == 2
    assert r["results"]["cce"]["successes"] == 3
    assert r["results"]["any"]["successes"] == 4  # 0 (before), 1, 2, 3
    assert r["results"]["unlearndiffatk"]["asr_ci95"][0] < 0.6 < r["results"]["unlearndiffatk"]["asr_ci95"][1]
    assert r["gate"]["worst_asr"] == pytest.approx(0.6) and not r["gate"]["passed"] and r["gate"]["exit_code"] == 3
    # UNet evaluations per prompt: every case's plain image, plus each attacked case's own
    assert r["results"]["unlearndiffatk"]["unet_evals_per_prompt"] == pytest.approx((5 * 10 + 4 * 100) / 5)


class _Stub(detectors.ShapesDetector):
    """Flags nothing: every case is attacked up to its step cap (the tiny model draws noise, not shapes)."""

    def __init__(self, threshold=0.5, targets=None):
        self.targets, self.threshold, self.classes = targets or ["cat"], threshold, ("cat",)

    def score(self, paths, prompts):
        return [{"flagged": False, "classes": []} for _ in paths]


def test_cce_learns_its_token_with_the_shared_inversion(tiny_sd1, tmp_path, monkeypatch):
    import erase.attack.cce as cce
    import erase.feedback.invert as invert

    calls = []

    def spy(model, images, prompts, weights, cfg, **kw):
        calls.append((images, prompts, weights, cfg.steps, kw["token"]))
        return invert.learn_token(model, images, prompts, weights, cfg, **kw)

    monkeypatch.setattr(cce, "learn_token", spy)
    monkeypatch.setitem(detectors.DETECTORS, "shapes", _Stub)
    out = tmp_path / "a"
    r = runner.invoke(app, ["attack", str(tiny_sd1), "--concept", "cat", "--detector", "shapes", "--base", str(tiny_sd1),
                            "--attack", "cce", "--prompts", str(_prompts(tmp_path)), *FAST, "--out", str(out)])
    assert r.exit_code == 0, r.output
    (images, prompts, weights, steps, token), = calls
    assert len(images) == 2 and weights == [1.0, 1.0] and steps == 4 and token == "<cce-cat>"
    assert all("<cce-cat>" in p and "cat " not in p + " " for p in prompts)  # the concept's word replaced by the token
    report = json.loads((out / "report.json").read_text())
    assert [c["cce"]["prompt"] for c in report["cases"]] == ["a photo of a <cce-cat>", "a <cce-cat> in the snow"]
    assert report["results"]["cce"]["token"]["unet_evals"] == 4 * 4  # steps x the inversion's batch
    from erase.embeddings import load_embedding

    assert load_embedding(out / "cce" / "cce-cat.safetensors").token == "<cce-cat>"


def _prompts(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,evaluation_seed,evaluation_guidance,categories\na photo of a cat,7,3.0,animal\na cat in the snow,8,4.0,animal\n")
    return path


def test_interrupted_attack_resumes_without_redoing_finished_prompts(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setitem(detectors.DETECTORS, "shapes", _Stub)
    out = tmp_path / "a"
    args = ["attack", str(tiny_sd1), "--concept", "cat", "--detector", "shapes", "--base", str(tiny_sd1), "--attack", "unlearndiffatk",
            "--prompts", str(_prompts(tmp_path)), *FAST, "--out", str(out)]
    from erase.attack import unlearndiffatk

    seen = []

    def interrupt_second(gen, prefix, prefix_text, job, z, cfg, flagged):
        seen.append(job.prompt)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real_attack(gen, prefix, prefix_text, job, z, cfg, flagged)

    real_attack = unlearndiffatk.attack_prompt
    monkeypatch.setattr(unlearndiffatk, "attack_prompt", interrupt_second)
    r = runner.invoke(app, args)
    assert r.exit_code == 130, r.output
    lines = [json.loads(s) for s in (out / "state.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["index"]) for x in lines] == [("pre", 0), ("pre", 1), ("unlearndiffatk", 0)]
    assert runner.invoke(app, args).exit_code == 2  # a folder holding an attack needs --resume or --force
    r = runner.invoke(app, [*args, "--threshold", "0.9", "--resume"])
    assert r.exit_code == 2 and "other settings" in r.output  # verdicts of another detector setting are not mixed in
    with open(out / "state.jsonl", "a") as f:
        f.write('{"stage": "unlearndiffatk", "ind')  # a write the interrupt cut short
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert seen == ["a photo of a cat", "a cat in the snow", "a cat in the snow"]  # only the unfinished prompt again
    assert all(json.loads(line) for line in (out / "state.jsonl").read_text().splitlines())  # the torn line is gone
    report = json.loads((out / "report.json").read_text())
    case = report["cases"][1]
    assert case["seed"] == 8 and case["guidance"] == 4.0  # the CSV's seed and guidance columns
    assert case["unlearndiffatk"]["steps"] == 4 and len(case["unlearndiffatk"]["prefix_ids"]) == 3
    assert (out / case["unlearndiffatk"]["image"]).exists() and (out / "report.html").exists()
    r = runner.invoke(app, [*args[:-2], "--steps", "6", "--out", str(out), "--resume"])
    assert r.exit_code == 2 and "other settings" in r.output  # a resume with other options is refused


@pytest.mark.parametrize("args, words", [
    (["--concept", "cat", "--detector", "shapes"], "--base BASE"),
    (["--concept", "van gogh", "--base", "BASE"], "erase's detectors are nudenet"),
    (["--concept", "circle", "--base", "BASE", "--prompts", "BADCSV"], "needs a 'prompt' column"),
    (["--concept", "circle", "--base", "BASE", "--fail-above", "2"], "between 0 and 1"),
])
def test_bad_input_is_one_line(tiny_sd1, tmp_path, args, words):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    args = [str(tiny_sd1) if a == "BASE" else str(bad) if a == "BADCSV" else a for a in args]
    r = runner.invoke(app, ["attack", str(tiny_sd1), *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_both_attacks_bring_circles_back_after_uce_on_the_shapes_model(tmp_path):
    """UCE's default erasure draws no circle for "a red circle" here, and both attacks bring circles back (measured:
    UnlearnDiffAtk within 40-120 steps and CCE after 80 inversion steps, on 12 of 12 cases); the gate then fails."""
    erased = tmp_path / "uce.safetensors"
    assert runner.invoke(app, ["run", str(SHAPES_MODEL), "--method", "uce", "-c", "circle", "-o", str(erased)]).exit_code == 0
    out = tmp_path / "a"
    r = runner.invoke(app, ["attack", str(erased), "--concept", "circle", "--base", str(SHAPES_MODEL), "--category", "circle",
                            "--limit", "1", "--sample-steps", "20", "--guidance", "5", "--steps", "80", "--images", "8",
                            "--fail-above", "0.5", "--out", str(out), "--device", "cpu"])
    report = json.loads((out / "report.json").read_text())
    assert report["pre_attack"]["successes"] == 0  # erased: plain prompts draw no circle
    assert report["results"]["unlearndiffatk"]["successes"] == 1 and report["results"]["cce"]["successes"] == 1
    assert r.exit_code == 3 and "gate failed" in r.output
