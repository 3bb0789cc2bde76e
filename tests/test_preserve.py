"""Preservation: --preserve parsing, the automatic choice of neighbours, the retain term, and `none` = the reference."""

from pathlib import Path

import pytest
import torch

from erase.engine.preserve import PreserveSpec, Retain, nearest_concepts, parse_preserve, preserved_prompts
from erase.errors import UsageError
from erase.vocabulary import expand, load_vocabulary, without

SHAPES_MODEL = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "shapes-sd.safetensors"


def test_preserve_option_parsing(tmp_path):
    assert parse_preserve(None) == PreserveSpec(concepts=[], auto=0, hold_empty=True)
    assert parse_preserve("auto") == PreserveSpec(concepts=[], auto=5, hold_empty=True)
    assert parse_preserve("auto:3, sky, sky ,tree") == PreserveSpec(concepts=["sky", "tree"], auto=3, hold_empty=True)
    assert parse_preserve("none").none
    f = tmp_path / "keep.txt"
    f.write_text("# people\nwoman\n\nman\n")
    assert parse_preserve("sky", f).concepts == ["sky", "woman", "man"]
    for bad in ("none, sky", "auto:0", "auto:x"):
        with pytest.raises(UsageError):
            parse_preserve(bad)


def test_unknown_vocabulary_is_a_usage_error_naming_the_builtins(tmp_path):
    with pytest.raises(UsageError, match="builtin:general, builtin:shapes"):
        load_vocabulary("builtin:nope")
    bad = tmp_path / "v.toml"
    bad.write_text('concepts = ["a"]\ntemplates = ["a {colour} thing"]\n')
    with pytest.raises(UsageError, match="exactly one"):
        load_vocabulary(bad)


def test_vocabulary_expansion_and_removal():
    vocab = load_vocabulary("builtin:shapes")
    prompts = expand("circle", vocab)
    assert "a red circle" in prompts and "a drawing of a circle in orange" in prompts and "circle" in prompts
    assert len(prompts) == len(set(prompts)) == 4 * 6 + 2
    assert without("a photo of a red circle", "circle") == "a photo of a red" and without("circle", "circle") == ""
    assert preserved_prompts(["", "square"], vocab, expand_concepts=False) == ["", "square"]
    assert preserved_prompts(["", "square"], vocab, expand_concepts=True)[:2] == ["", "a red square"]


def test_auto_finds_the_shapes_the_circle_edit_damages():
    """On the shapes model squares are what every circle erasure damaged first (benchmarks/README.md): auto must see that."""
    from erase.models import open_model

    text = open_model(SHAPES_MODEL).load_text_encoder()
    near = nearest_concepts(lambda p, length: text.encode(p, length=length).embeds, text.tokenizers[0], ["circle"], load_vocabulary("builtin:shapes"), 3)
    assert [c for c, _ in near["circle"]][0] == "square"
    assert len(near["circle"]) == 3 and all(c != "circle" for c, _ in near["circle"])


def _retain(tiny_sd1, weight=2.0):
    from erase.engine.params import select_trainable
    from erase.engine.sampling import EvalCounter
    from erase.models import open_model

    model = open_model(tiny_sd1)
    unet = model.load_unet()
    params = select_trainable(unet, "xattn")
    gen = torch.Generator().manual_seed(0)
    retain = Retain(["", "a dog"], weight=weight, per_step=1, unet=unet, scheduler=model.scheduler(), guidance=3.0, sample_steps=4,
                    reuse=2, latent_shape=(1, 4, 8, 8), resolution=16, generator=gen, device=torch.device("cpu"), counter=EvalCounter())
    text = model.load_text_encoder()
    retain.embeddings = {p: text.encode([p]) for p in ["", "a dog"]}
    return retain, params, unet


def test_retain_term_is_zero_for_the_input_model_and_measures_drift_from_it(tiny_sd1):
    from erase.engine.sampling import EvalCounter, predict

    retain, params, unet = _retain(tiny_sd1)
    assert retain.loss(None).item() == 0.0  # the student is still the input model
    frozen = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # the student moves away from the input model
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    moved = {n: p.detach().clone() for n, p in params.items()}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    retain.current, retain.pending = [["a dog"]], [{"a dog": [(z, 1)]}]  # stream 0: one queued latent at t_1 for the slot's prompt
    got = retain.loss(None)
    assert all(torch.equal(q, moved[n]) for n, q in params.items())  # the student's weights are back in place
    assert all(torch.equal(retain.frozen[n], frozen[n]) for n in frozen)  # and the frozen copy is the input's
    t = retain.scheduler.timesteps[1]
    with torch.no_grad():
        student = predict(unet, z, t, retain.embeddings["a dog"], 16, EvalCounter())
        for n, q in params.items():
            q.data = frozen[n].clone()
        original = predict(unet, z, t, retain.embeddings["a dog"], 16, EvalCounter())
    assert got.item() == pytest.approx(2.0 * torch.nn.functional.mse_loss(student, original).item(), rel=1e-5)
    assert got.item() > 0


def test_loss_sampling_holds_the_concept_the_edit_moves_most_most_often(tiny_sd1):
    """--preserve-sampling loss: a slot's concept is drawn in proportion to its running retain loss, which each term
    updates; uniform ignores it."""
    from erase.engine.sampling import EvalCounter

    retain, params, unet = _retain(tiny_sd1)
    embeddings = retain.embeddings
    concept_of = {"": "", "a dog": "dog", "a red dog": "dog", "a cat": "cat"}
    retain.__init__(list(concept_of), weight=1.0, per_step=1, unet=unet, scheduler=retain.scheduler, guidance=3.0, sample_steps=4, reuse=2,
                    latent_shape=(1, 4, 8, 8), resolution=16, generator=retain.generator, device=torch.device("cpu"), counter=EvalCounter(),
                    sampling="loss", concept_of=concept_of)
    retain.running_loss = {"": 0.01, "dog": 0.97, "cat": 0.02}
    g = torch.Generator().manual_seed(0)
    drawn = [concept_of[retain._draw(g)] for _ in range(400)]
    assert 0.9 < drawn.count("dog") / 400 and {"a dog", "a red dog"} <= {retain._draw(g) for _ in range(200)}
    retain.sampling = "uniform"
    assert 0.35 < [concept_of[retain._draw(g)] for _ in range(400)].count("dog") / 400 < 0.65  # 2 of the 4 prompts
    # each term moves its concept's running loss toward the term's error (here: 0, the student is the input model)
    retain.sampling = "loss"
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    retain.embeddings = {**embeddings, "a cat": embeddings["a dog"]}
    retain.current, retain.pending = [["a cat"]], [{"a cat": [(z, 1)]}]
    retain.loss(None)
    assert retain.running_loss["cat"] == pytest.approx(0.9 * 0.02) and retain.running_loss["dog"] == 0.97
    assert retain.state_dict()["running_loss"] == retain.running_loss


def test_the_command_line_offers_every_retain_sampling_the_engine_has():
    """The CLI spells the choices out (importing the engine would load torch at start-up); they must stay the engine's."""
    from erase.cli.run import PreserveSampling
    from erase.engine.preserve import SAMPLING

    assert [m.value for m in PreserveSampling] == list(SAMPLING)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_short_padding_gives_the_prompts_own_positions_unchanged(tiny_files, family):
    # the towers are causal: the auto choice encodes its ~1900 short prompts padded to the longest, not to 77
    from erase.models import open_model

    text = open_model(tiny_files[family]).load_text_encoder()
    prompts = ["a photo of a cat", "dog"]
    full, short = text.encode(prompts).embeds, text.encode(prompts, length=8).embeds
    n = [len(text.tokenizers[0](p).input_ids) for p in prompts]
    for k in range(len(prompts)):
        assert torch.allclose(full[k, : n[k]], short[k, : n[k]], atol=1e-5)
