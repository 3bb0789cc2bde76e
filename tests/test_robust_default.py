"""Issue 36's mechanisms: latents drawn on each step's own prompt, the retain term on the input model's own trajectories
(its target free), paired retain prompts on the erasure's latents, the retain-gradient projection, and the inner attack
that shares the attacked term's forward."""

import pytest
import torch

from erase.engine.sampling import EvalCounter, predict


def _sdd(tiny_sd1, **cfg):
    from erase.engine.params import select_trainable
    from erase.methods.sdd import SDD, SDDConfig
    from erase.models import open_model
    from erase.vocabulary import Vocabulary

    model = open_model(tiny_sd1)
    unet = model.load_unet()
    params = select_trainable(unet, "xattn")
    vocab = Vocabulary("t", ["cat", "dog"], ["a {}", "a {colour} {}"], {"colour": ["red", "blue"]})
    sdd = SDD(SDDConfig(sample_steps=4, reuse=2, expand=True, target="frozen", **cfg), ["cat"], unet=unet, scheduler=model.scheduler(),
              latent_shape=(1, 4, 8, 8), resolution=16, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
              counter=EvalCounter(), vocab=vocab)
    text = model.load_text_encoder()
    prompts = list(dict.fromkeys(sdd.prompts() + ["a dog", "a red dog", "a blue dog", "dog"]))
    sdd.embeddings = {p: text.encode([p]) for p in prompts}
    return sdd, params, unet


def test_latents_are_drawn_on_each_steps_own_prompt_by_the_chosen_sampler(tiny_sd1):
    """--sample-on own: the step's latents come from a trajectory on its own student prompt ("a red cat"), not on the
    concepts joined; --trajectories frozen: from the input model, whatever the student (or the EMA) has become."""
    sdd, params, unet = _sdd(tiny_sd1, sample_on="own", trajectories="frozen")
    assert sdd.trajectory_prompt(0) == sdd.student_prompt(0) != sdd.trajectory_prompt(1)
    calls = []
    real = sdd._harvest
    sdd._harvest = lambda teacher, streams, prompt=None: (calls.append((teacher, prompt)), real(teacher, streams, prompt))[1]
    sdd.draw(0, teacher={"not": torch.zeros(1)})
    assert calls[0][1] == sdd.student_prompt(0) and set(sdd.pending[0]) == {sdd.student_prompt(0)}
    frozen = sdd.sampler({"not": torch.zeros(1)})
    assert frozen is sdd.frozen  # the input model's weights, never the teacher passed in
    joined, *_ = _sdd(tiny_sd1)
    assert joined.trajectory_prompt(0) == joined.trajectory_prompt(1) == "cat" and joined.sampler("T") == "T"  # the reference


def test_the_retain_term_on_the_input_models_trajectories_takes_its_target_from_them(tiny_sd1):
    """sampler frozen: the trajectory's own conditional prediction at each kept latent is the target (the input model's
    prediction there): the same loss as an extra forward gives, one UNet evaluation fewer per retained sample."""
    from erase.engine.params import select_trainable
    from erase.engine.preserve import Retain
    from erase.models import open_model

    model = open_model(tiny_sd1)
    unet = model.load_unet()
    params = select_trainable(unet, "xattn")
    original = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # the student has moved away from the input: the retain term is not zero
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    text = model.load_text_encoder()
    losses, counts = {}, {}
    for sampler in ("teacher", "frozen"):
        counter = EvalCounter()
        retain = Retain(["a dog"], weight=1.0, per_step=1, unet=unet, scheduler=model.scheduler(), guidance=3.0, sample_steps=4, reuse=1,
                        latent_shape=(1, 4, 8, 8), resolution=16, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                        counter=counter, frozen=original, sampler=sampler)
        retain.embeddings = {p: text.encode([p]) for p in ["", "a dog"]}
        losses[sampler] = retain.loss(original).item()  # a teacher sampling with the input's weights draws the same latents
        counts[sampler] = counter.total
    assert losses["frozen"] == pytest.approx(losses["teacher"], rel=1e-4) and losses["frozen"] > 0
    # the same trajectory; the input model's adds the last latent's guided call (2) and saves the target's forward (1)
    assert counts["frozen"] == counts["teacher"] + 2 - 1


def test_paired_prompts_hold_the_erased_prompt_naming_a_neighbour_at_the_erasures_own_latents(tiny_sd1):
    from erase.engine.preserve import Retain, swap_concept

    assert swap_concept("a red cat", "cat", "dog") == "a red dog" and swap_concept("cats and a cat", "cat", "dog") == "cats and a dog"
    sdd, params, unet = _sdd(tiny_sd1, sample_on="own")
    counter = sdd.counter
    retain = Retain(["a dog", "a red dog", "a blue dog"], weight=2.0, per_step=1, unet=unet, scheduler=sdd.scheduler, guidance=3.0,
                    sample_steps=4, reuse=2, latent_shape=(1, 4, 8, 8), resolution=16, generator=torch.Generator().manual_seed(0),
                    device=torch.device("cpu"), counter=counter, concept_of={"a dog": "dog", "a red dog": "dog", "a blue dog": "dog"},
                    paired=True)
    retain.embeddings = sdd.embeddings
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    d = sdd.draw(1, None)  # "a red cat"
    assert d.prompt == "a red cat"
    before = counter.total
    (term,) = list(retain.paired_terms(d, sdd.erased_prompts()))
    assert counter.total - before == 1 + 1 + 2  # the input model's forward, the student's forward and backward
    with torch.no_grad():
        want = predict(unet, d.z, d.t, sdd.embeddings["a red dog"], 16, weights=retain.frozen)
        got = predict(unet, d.z, d.t, sdd.embeddings["a red dog"], 16)
    assert term.item() == pytest.approx(2.0 * torch.nn.functional.mse_loss(got, want).item(), rel=1e-5) and term.item() > 0
    assert list(Retain.paired_terms(retain, d, {})) == []  # a prompt whose concept is unknown (composite mode) has no pair


def test_projection_removes_only_the_part_of_the_erasure_gradient_that_fights_the_retain_term():
    from erase.engine.trainer import project_conflict

    retain = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    conflicting = [torch.tensor([-2.0, 1.0]), torch.tensor([3.0])]
    project_conflict(conflicting, retain)
    assert torch.equal(conflicting[0], torch.tensor([0.0, 1.0])) and torch.equal(conflicting[1], torch.tensor([3.0]))
    agreeing = [torch.tensor([2.0, 1.0]), torch.tensor([3.0])]
    project_conflict(agreeing, retain)
    assert torch.equal(agreeing[0], torch.tensor([2.0, 1.0]))


def test_projected_training_steps_along_a_gradient_that_does_not_fight_the_retain_term(tiny_sd1, tmp_path, monkeypatch):
    """--preserve-project: after the step's backward, the gradient the optimizer sees has a non-negative inner product
    with the retain term's own gradient."""
    from rich.console import Console

    import erase.engine.trainer as trainer_module
    from erase.engine.trainer import TrainConfig
    from erase.run import RunOptions, erase_concepts

    seen = []
    real = trainer_module.project_conflict

    def watch(erase, retain):
        real(erase, retain)
        seen.append(float(sum((e * r).sum() for e, r in zip(erase, retain))))

    monkeypatch.setattr(trainer_module, "project_conflict", watch)
    erase_concepts(RunOptions(model=tiny_sd1, concepts=["cat"], out=tmp_path / "o.safetensors", train=TrainConfig(steps=3, lr=1e-3, project_retain=True),
                              method_config={"sample_steps": 4, "reuse": 2}, resolution=16, device="cpu", preserve="dog"),
                   Console(quiet=True), progress=False)
    assert len(seen) == 3 and all(v >= -1e-6 * max(1.0, abs(v)) for v in seen)


def test_the_shared_inner_attack_moves_the_prefix_once_per_step_for_one_forward_and_two_backwards(tiny_sd1, tmp_path):
    """--adversarial-steps 0: the attacked term's forward also gives the prefix its step: per step 1 (the input model's
    prediction) + 1 (the attacked forward) + 2 (its backward for the weights) + 2 (for the prefix) = 6 UNet evaluations."""
    import json

    from typer.testing import CliRunner

    from erase.cli import app

    args = ["run", str(tiny_sd1), "-c", "cat", "--steps", "2", "--sample-steps", "4", "--resolution", "16", "--preserve", "dog", "--json"]
    plain = CliRunner().invoke(app, [*args, "--no-adversarial", "-o", str(tmp_path / "a.safetensors")])
    shared = CliRunner().invoke(app, [*args, "--adversarial", "--adversarial-steps", "0", "--adversarial-lr", "0.05", "-o", str(tmp_path / "b.safetensors")])
    assert plain.exit_code == 0 and shared.exit_code == 0, shared.output
    a, b = json.loads(plain.stdout), json.loads(shared.stdout)
    assert b["unet_evals_per_step"] - a["unet_evals_per_step"] == pytest.approx(6)
    assert b["config"]["adversarial"]["steps"] == 0 and a["output_sha256"] != b["output_sha256"]


def test_paired_prompts_draw_the_nearest_neighbour_most_and_a_named_one_as_the_nearest():
    from erase.engine.preserve import pair_weights

    w = pair_weights(["square", "heart", "star"], {"square": 0.5, "heart": 0.07, "star": -0.35})
    assert w.sum().item() == pytest.approx(1.0) and w[0] > 0.98 and w[1] > w[2]
    named = pair_weights(["square", "kite"], {"square": 0.5})  # "kite" named by the user: no measured similarity
    assert named[0].item() == pytest.approx(named[1].item())


def test_sdd_with_preservation_defaults_to_keys_and_values_under_the_shared_inner_attack(tiny_sd1, tmp_path):
    """erase run's SDD default (issue 36): the input model's latents on each step's own prompt, at most one per DDIM step
    of a short schedule, attn2's keys and values trained, 3 retain prompts, the inner attack sharing the attacked term's
    forward; --preserve none is the reference (EMA teacher on the concepts joined, all of attn2, no attack)."""
    import json

    from safetensors import safe_open
    from typer.testing import CliRunner

    from erase.cli import app

    def run(name, *extra):
        out = tmp_path / f"{name}.safetensors"
        r = CliRunner().invoke(app, ["run", str(tiny_sd1), "-c", "cat", "--steps", "2", "--sample-steps", "4", "--resolution", "16",
                                     "--lr", "1e-3", "-o", str(out), "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout), out

    default, out = run("default", "--preserve", "dog")
    cfg = default["config"]
    assert (cfg["train_set"], cfg["preserve_per_step"], cfg["preserve_paired"], cfg["adversarial"]) == \
        ("xattn-kv", 3, False, {"steps": 0, "lr": 1e-2, "tokens": 1})
    m = cfg["method_config"]
    assert (m["trajectories"], m["sample_on"], m["reuse"]) == ("frozen", "own", 4)  # 25 latents, but only 4 DDIM steps
    with safe_open(str(tiny_sd1), "pt") as a, safe_open(str(out), "pt") as b:
        changed = {k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))}
    assert changed and all("attn2.to_k" in k or "attn2.to_v" in k for k in changed)
    reference, _ = run("reference", "--preserve", "none")
    cfg = reference["config"]
    assert (cfg["train_set"], cfg["adversarial"], cfg["method_config"]["trajectories"], cfg["method_config"]["reuse"]) == \
        ("xattn", None, "teacher", 1)
    asked, _ = run("asked", "--preserve", "dog", "--train", "xattn", "--no-adversarial", "--preserve-per-step", "1", "--reuse", "2")
    cfg = asked["config"]
    assert (cfg["train_set"], cfg["adversarial"], cfg["preserve_per_step"], cfg["method_config"]["reuse"]) == ("xattn", None, 1, 2)


@pytest.mark.parametrize("trajectories", ["frozen", "teacher"])
def test_eta_pushes_the_target_away_from_the_concept_by_the_input_models_predictions(tiny_sd1, trajectories):
    """--eta: target = eps(z, "a red") - eta * (eps(z, "a red cat") - eps(z, "a red")), all the input model's, whatever the
    student has become; on the input model's own trajectories eps(z, "a red cat") is the one their guided call made."""
    from erase.models import open_model

    sdd, params, unet = _sdd(tiny_sd1, sample_on="own", trajectories=trajectories, eta=1.5)
    assert sdd.free_concept_eps == (trajectories == "frozen")
    untouched = open_model(tiny_sd1).load_unet()
    with torch.no_grad():  # the student has moved away from the input model
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    d = sdd.draw(1, None)
    assert d.prompt == "a red cat"
    with torch.no_grad():
        e_w, e_c = (predict(untouched, d.z, d.t, sdd.embeddings[p], 16) for p in ("a red", "a red cat"))
    expected = e_w - 1.5 * (e_c - e_w)
    assert torch.allclose(d.target, expected, rtol=1e-4, atol=1e-5)
    assert (d.target - e_w).abs().max() > 1e-3  # the push is there


def test_the_spared_push_loses_only_the_part_it_shares_with_the_neighbours_direction():
    """Per sample: a push along the neighbour keeps nothing of that part, an orthogonal part stays whole, and a push
    against the neighbour is left as it is (only a shared part is removed)."""
    from erase.engine.sampling import spared

    n = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    push = torch.tensor([[[3.0, 2.0]], [[-3.0, 2.0]]])
    out = spared(push, n)
    assert torch.allclose(out[0], torch.tensor([[0.0, 2.0]])) and torch.equal(out[1], push[1])
    assert (out[0] * n[0]).sum() == 0


def test_eta_spare_pushes_the_target_away_from_what_the_concept_does_not_share_with_its_neighbour(tiny_sd1):
    """--eta-spare: target = eps(z, w) - eta * spared(eps(z, c) - eps(z, w), eps(z, n) - eps(z, w)), n the erased prompt
    naming the nearest neighbour ("a red dog" for "a red cat"), all the input model's, for one more evaluation a step."""
    from erase.engine.sampling import spared
    from erase.errors import UsageError
    from erase.methods.sdd import SDDConfig

    sdd, params, unet = _sdd(tiny_sd1, sample_on="own", trajectories="frozen", eta=1.0, eta_spare=True)
    sdd.neighbours = {"cat": "dog"}
    d = sdd.draw(1, None)
    assert d.prompt == "a red cat" and sdd.spared_prompt(d.prompt) == "a red dog"
    with torch.no_grad():
        e_w, e_c, e_n = (predict(unet, d.z, d.t, sdd.embeddings[p], 16) for p in ("a red", "a red cat", "a red dog"))
    assert torch.allclose(d.target, e_w - spared(e_c - e_w, e_n - e_w), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(d.target, e_w - (e_c - e_w), rtol=1e-4, atol=1e-5)  # the neighbour's part is gone
    with pytest.raises(UsageError, match="--eta above 0"):
        SDDConfig(eta_spare=True, target="frozen").validate()
    from erase.run import concept_eps_cost, expected_evals_per_step

    cost = {spare: concept_eps_cost({"eta": 1.0, "eta_spare": spare, "trajectories": "frozen", "sample_on": "own"}) for spare in (False, True)}
    assert expected_evals_per_step(50, 25, concept_eps=cost[True]) - expected_evals_per_step(50, 25, concept_eps=cost[False]) == 1


def test_eta_needs_the_input_models_target():
    from erase.errors import UsageError
    from erase.methods.sdd import SDDConfig

    with pytest.raises(UsageError, match="--target frozen"):
        SDDConfig(eta=1.0, target="self").validate()
    with pytest.raises(UsageError, match=">= 0"):
        SDDConfig(eta=-1.0, target="frozen").validate()
