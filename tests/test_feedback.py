"""HFI: collect -> (labels) -> reward -> invert -> embeddings in run / generate; SDD's Beta(3, 3) timesteps.

The labelling page and the auto-labeller are tested in test_feedback_label.py.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from erase.cli import app
from erase.embeddings import Embedding, add_embeddings, load_embedding, save_embedding
from erase.engine.sampling import beta_weights
from erase.feedback.collect import read_collection, regenerate
from erase.feedback.labels import append
from erase.feedback.reward import bradley_terry, comparisons, rank_rewards, rewards
from erase.models import open_model

runner = CliRunner()
TOKEN = "<flagged>"


@pytest.fixture(scope="module")
def collection(tiny_sd1, tmp_path_factory):
    out = tmp_path_factory.mktemp("fb") / "coll"
    r = runner.invoke(app, ["feedback", "collect", str(tiny_sd1), "--concept", "cat", "--out", str(out), "--n", "4", "-p", "a cat",
                            "-p", "a photo of a cat", "--steps", "2", "--device", "cpu", "--batch", "3", "--size", "32"])
    assert r.exit_code == 0, r.output
    return out


def _label(folder, harmful: dict[str, bool], labeller="ann"):
    for image, h in harmful.items():
        append(folder, {"labeller": labeller, "kind": "binary", "image": image, "harmful": h})


def test_collect_writes_a_manifest_that_regenerates_every_image(collection):
    info, rows = read_collection(collection)
    assert info["concept"] == "cat" and info["images"] == 4 and len(rows) == 4
    assert [r["prompt"] for r in rows] == ["a cat", "a photo of a cat", "a cat", "a photo of a cat"]
    assert [r["seed"] for r in rows] == [0, 1, 2, 3]
    names = [rows[3]["image"], rows[1]["image"]]  # another order and batch than they were drawn in
    for name, image in zip(names, regenerate(collection, names)):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(collection / "images" / name).convert("RGB")))


def test_collect_refuses_a_folder_that_already_holds_a_collection(collection, tiny_sd1):
    r = runner.invoke(app, ["feedback", "collect", str(tiny_sd1), "--concept", "cat", "--out", str(collection), "--n", "1"])
    assert r.exit_code == 2 and "already holds a collection" in r.output


def test_binary_rewards_are_the_share_of_labellers_who_flag_an_image():
    answers = [{"kind": "binary", "labeller": "a", "image": "x", "harmful": True},
               {"kind": "binary", "labeller": "b", "image": "x", "harmful": False},
               {"kind": "binary", "labeller": "a", "image": "y", "harmful": False},
               {"kind": "binary", "labeller": "a", "image": "y", "harmful": True}]  # a's latest answer counts
    found, kind = rewards(answers)
    assert kind == "binary" and found == {"x": 0.5, "y": 1.0}


def test_bradley_terry_orders_images_as_the_rankings_do():
    truth = ["a", "b", "c", "d", "e", "f"]  # most harmful first
    rng = np.random.default_rng(0)
    answers = []
    for _ in range(30):
        group = list(rng.choice(truth, 5, replace=False))
        ordered = sorted(group, key=truth.index)
        answers.append({"kind": "rank", "group": group, "ranks": {x: i + 1 for i, x in enumerate(ordered)}})
    scores = bradley_terry(comparisons(answers))
    assert sorted(scores, key=lambda x: -scores[x]) == truth
    r = rank_rewards(answers)
    assert r["a"] == 1.0 and r["f"] == 0.0


def test_excluded_images_take_no_part_in_the_rankings():
    answers = [{"kind": "rank", "group": ["a", "b", "c"], "ranks": {"a": 2, "b": "exclude", "c": 1}}]
    assert comparisons(answers) == [("c", "a")]


def test_embedding_files_load_in_the_a1111_and_diffusers_layouts(tmp_path):
    from safetensors.torch import save_file

    vec = torch.randn(1, 32)
    save_embedding(Embedding(TOKEN, [vec]), tmp_path / "mine.safetensors")
    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:  # A1111: one tensor (its name is the file's), 2-D
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (1, 32)
    assert load_embedding(tmp_path / "mine.safetensors").token == TOKEN  # our metadata names the token
    save_file({"<cat-toy>": vec[0]}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers' textual-inversion script
    emb = load_embedding(tmp_path / "learned_embeds.safetensors")
    assert emb.token == "<cat-toy>" and torch.equal(emb.vectors[0], vec)
    torch.save({"string_to_param": {"*": vec}, "name": "toy"}, tmp_path / "toy.pt")  # A1111 .pt
    assert load_embedding(tmp_path / "toy.pt").token == "toy"
    save_file({"clip_l": vec, "clip_g": torch.randn(1, 64)}, str(tmp_path / "xl.safetensors"))  # SDXL pair
    assert [v.shape[1] for v in load_embedding(tmp_path / "xl.safetensors").vectors] == [32, 64]


def test_diffusers_load_textual_inversion_reads_our_file_as_we_do(tiny_sd1, tmp_path):
    from diffusers.loaders import TextualInversionLoaderMixin

    model = open_model(tiny_sd1)
    vec = torch.randn(1, 32)
    save_embedding(Embedding(TOKEN, [vec]), tmp_path / "tok.safetensors")
    ours = model.load_text_encoder([tmp_path / "tok.safetensors"])
    theirs = model.load_text_encoder()

    class Loader(TextualInversionLoaderMixin):  # the mixin as StableDiffusionPipeline uses it, without the other components
        tokenizer, text_encoder, hf_device_map, components = theirs.tokenizers[0], theirs.encoders[0], None, {}

    Loader().load_textual_inversion(str(tmp_path / "tok.safetensors"), token=TOKEN)
    assert torch.equal(ours.encode(["a <flagged> cat"]).embeds, theirs.encode(["a <flagged> cat"]).embeds)


def test_multi_vector_embeddings_spell_out_every_vector(tiny_sd1):
    model = open_model(tiny_sd1)
    text = model.load_text_encoder()
    vecs = torch.randn(3, 32)
    add_embeddings(text, [Embedding("<three>", [vecs])])
    assert text.spell("a <three> cat") == "a <three> <three>_1 <three>_2 cat"
    ids = text.tokenizers[0]("a <three> cat").input_ids
    table = text.encoders[0].get_input_embeddings().weight
    assert torch.equal(table[text.tokenizers[0].convert_tokens_to_ids("<three>_2")], vecs[2]) and len(ids) == 5


def test_a_token_that_is_already_a_word_is_refused(tiny_sd1, tmp_path):
    save_embedding(Embedding("cat", [torch.randn(1, 32)]), tmp_path / "cat.safetensors")
    with pytest.raises(Exception, match="already a word"):
        open_model(tiny_sd1).load_text_encoder([tmp_path / "cat.safetensors"])


def test_invert_learns_only_the_new_token_from_the_flagged_images(collection, tiny_sd1, tmp_path):
    _, rows = read_collection(collection)
    _label(collection, {r["image"]: i < 2 for i, r in enumerate(rows)})
    out = tmp_path / "tok.safetensors"
    r = runner.invoke(app, ["feedback", "invert", str(collection), str(tiny_sd1), "--out", str(out), "--token", TOKEN, "--steps", "3",
                            "--lr", "0.05", "--device", "cpu", "--timesteps", "beta"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.with_name("tok.report.json").read_text())
    assert report["images_used"] == 2 and {x["image"] for x in report["top_images"]} == {rows[0]["image"], rows[1]["image"]}
    assert report["same_model_as_collection"] and report["relative_change_from_init"][0] > 0
    emb = load_embedding(out)
    assert emb.token == TOKEN and emb.vectors[0].shape == (1, 32) and emb.metadata["erase.labels"] == "binary"
    # the vector starts from the init word ("cat", the concept) and moved; every other word encodes as before
    model = open_model(tiny_sd1)
    plain, taught = model.load_text_encoder(), model.load_text_encoder([out])
    assert torch.equal(plain.encode(["a photo of a cat"]).embeds, taught.encode(["a photo of a cat"]).embeds)
    assert not torch.equal(plain.encode(["a cat"]).embeds, taught.encode([f"a {TOKEN}"]).embeds)


def test_invert_runs_on_the_shared_trainer_under_bf16_with_checkpointing(collection, tiny_sd1, tmp_path):
    # the same loop as the erasures: autocast regions, fp32 token, gradient checkpointing; the loss matches fp32's
    _, rows = read_collection(collection)
    _label(collection, {r["image"]: i < 2 for i, r in enumerate(rows)})
    reports = {}
    for precision, extra in (("fp32", []), ("bf16", ["--gradient-checkpointing"])):
        out = tmp_path / f"{precision}.safetensors"
        r = runner.invoke(app, ["feedback", "invert", str(collection), str(tiny_sd1), "--out", str(out), "--token", TOKEN, "--steps", "2",
                                "--lr", "0.05", "--device", "cpu", "--precision", precision, *extra])
        assert r.exit_code == 0, r.output
        reports[precision] = json.loads(out.with_name(f"{precision}.report.json").read_text())
        assert load_embedding(out).vectors[0].dtype == torch.float32
    assert reports["bf16"]["precision"].startswith("bf16 autocast") and reports["bf16"]["relative_change_from_init"][0] > 0
    first = [reports[p]["loss_curve"][0][1] for p in ("fp32", "bf16")]
    assert first[1] == pytest.approx(first[0], rel=0.05)


def test_invert_without_any_flagged_image_is_one_clear_error(tiny_sd1, tmp_path, collection):
    import shutil

    folder = tmp_path / "c"
    shutil.copytree(collection, folder)
    (folder / "labels.jsonl").unlink(missing_ok=True)
    _, rows = read_collection(folder)
    _label(folder, {r["image"]: False for r in rows})
    r = runner.invoke(app, ["feedback", "invert", str(folder), str(tiny_sd1), "--out", str(tmp_path / "t.safetensors"), "--steps", "1"])
    assert r.exit_code == 2 and "nothing to invert" in r.output and not (tmp_path / "t.safetensors").exists()


def test_run_erases_a_learned_token_and_records_its_file(tiny_sd1, tmp_path):
    emb = tmp_path / "tok.safetensors"
    save_embedding(Embedding(TOKEN, [torch.randn(1, 32) * 3]), emb)
    outs = {}
    for label, extra in (("with", ["--embedding", str(emb)]), ("without", [])):
        outs[label] = tmp_path / f"{label}.safetensors"
        r = runner.invoke(app, ["run", str(tiny_sd1), "--method", "uce", "--concepts", TOKEN, "--preserve", "none", "--out", str(outs[label]), *extra])
        assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "with.report.json").read_text())
    assert report["config"]["embeddings"][0]["token"] == TOKEN and len(report["config"]["embeddings"][0]["sha256"]) == 64
    a, b = open_model(outs["with"]), open_model(outs["without"])
    key = next(k for k in a.ckpt.keys() if "attn2.to_k" in k)
    assert not torch.equal(a.ckpt.get(key), b.ckpt.get(key))  # the token's learned vector, not its spelling, was erased


def test_generate_with_an_embedding_draws_the_token_and_says_so(tiny_sd1, tmp_path):
    emb = tmp_path / "tok.safetensors"
    save_embedding(Embedding(TOKEN, [torch.randn(1, 32) * 3]), emb)
    images = {}
    for label, extra in (("with", ["--embedding", str(emb)]), ("without", [])):
        r = runner.invoke(app, ["generate", str(tiny_sd1), "-p", f"a {TOKEN}", "--steps", "2", "--size", "32", "--out", str(tmp_path / label), "--device", "cpu", *extra])
        assert r.exit_code == 0, r.output
        images[label] = next((tmp_path / label).rglob("*.png"))
    assert "TI hashes" in Image.open(images["with"]).text["parameters"]
    assert not np.array_equal(np.asarray(Image.open(images["with"])), np.asarray(Image.open(images["without"])))


def test_beta_timesteps_are_beta_3_3_over_the_trajectory():
    w = beta_weights(50)
    assert abs(w.sum().item() - 1) < 1e-6 and torch.allclose(w, w.flip(0))
    assert w[24] > 10 * w[2] and w[0] < 1e-4  # mass in the middle, little at either end
    k = torch.multinomial(w, 20000, replacement=True, generator=torch.Generator().manual_seed(0)).double() + 0.5
    x = k / 50
    assert abs(x.mean().item() - 0.5) < 0.01 and abs(x.var().item() - 1 / 28) < 0.003  # Beta(3, 3): mean 1/2, variance 1/28


def test_sdd_records_its_timesteps_option_and_uce_refuses_it(tiny_sd1, tmp_path):
    out = tmp_path / "b.safetensors"
    r = runner.invoke(app, ["run", str(tiny_sd1), "--concepts", "cat", "--timesteps", "beta", "--steps", "2", "--sample-steps", "4",
                            "--reuse", "4", "--preserve", "none", "--out", str(out), "--device", "cpu", "--resolution", "32"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.with_name("b.report.json").read_text())["config"]["method_config"]["timesteps"] == "beta"
    r = runner.invoke(app, ["run", str(tiny_sd1), "--method", "uce", "--concepts", "cat", "--timesteps", "beta", "--out", str(tmp_path / "u.safetensors")])
    assert r.exit_code == 2 and "--timesteps does not apply to --method uce" in r.output


class _ZeroUNet(torch.nn.Module):
    """A stand-in UNet that predicts zero noise: trajectories cost nothing, the draws are what is tested."""

    def forward(self, z, t, **kwargs):
        return type("Out", (), {"sample": torch.zeros_like(z)})()


@pytest.mark.parametrize("timesteps", ["uniform", "beta"])
def test_sdd_draws_its_training_steps_where_its_timesteps_option_puts_the_mass(tiny_sd1, timesteps):
    from erase.engine.sampling import EvalCounter
    from erase.methods.sdd import SDD, SDDConfig
    from erase.models import Conditioning, open_model

    K = 20
    sdd = SDD(SDDConfig(sample_steps=K, timesteps=timesteps), ["cat"], unet=_ZeroUNet(), scheduler=open_model(tiny_sd1).scheduler(),
              latent_shape=(1, 4, 2, 2), resolution=16, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
              counter=EvalCounter())
    sdd.embeddings = {p: Conditioning(torch.zeros(1, 77, 32)) for p in sdd.prompts()}
    ks = [k for _ in range(600) for _, k in sdd._harvest(None, [0])[0]]
    outer = sum(k < 0.2 * K or k >= 0.8 * K for k in ks) / len(ks)  # Beta(3, 3) puts 0.12 of its mass there, uniform 0.40
    assert (outer < 0.2) if timesteps == "beta" else (0.32 < outer < 0.48), outer


def test_evaluate_with_an_embedding_uses_the_token_and_records_the_file(tiny_sd1, tmp_path):
    emb = tmp_path / "tok.safetensors"
    save_embedding(Embedding(TOKEN, [torch.randn(1, 32) * 3]), emb)
    (tmp_path / "prompts.txt").write_text(f"a {TOKEN}\n")
    r = runner.invoke(app, ["evaluate", str(tiny_sd1), "--embedding", str(emb), "--detector", "shapes", "--target", "circle",
                            "--prompts", str(tmp_path / "prompts.txt"), "--n", "2", "--steps", "2", "--size", "32", "--device", "cpu",
                            "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["embeddings"] == [str(emb)]
    assert "TI hashes" in Image.open(next((tmp_path / "eval" / "erased").glob("*.png"))).text["parameters"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP vision tower with a projection, built in code and saved as a local folder (nothing is downloaded)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                              patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _shapes_collection(tmp_path):
    """A collection as `erase feedback collect` leaves it: each shape in red and in blue, twice (24 images, 32 px)."""
    from erase.shapes import SHAPES, render

    folder = tmp_path / "coll"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(24):
        shape, colour = SHAPES[i % 6], ("red", "blue")[(i // 6) % 2]
        row = {"image": f"{i:04d}-a-{colour}-{shape}.png", "prompt": f"a {colour} {shape}", "seed": i, "guidance": 7.5, "negative": ""}
        render(shape, colour, np.random.default_rng(i)).save(folder / "images" / row["image"])
        rows.append(row)
    (folder / "collection.json").write_text(json.dumps({"concept": "red shapes", "model": "x", "images": 24}))
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, rows


def test_reward_head_fits_separable_labels_and_scores_the_unlabelled_images(tiny_clip, tmp_path):
    from erase.feedback.reward_model import model_rewards

    folder, rows = _shapes_collection(tmp_path)
    red = {r["image"]: " red " in f" {r['prompt']} " for r in rows}
    labelled = {r["image"]: float(red[r["image"]]) for i, r in enumerate(rows) if i % 6 < 3}  # half the shapes labelled
    rewards_, record = model_rewards(f"clip:{tiny_clip}", {r["image"]: folder / "images" / r["image"] for r in rows}, labelled)
    assert record["labelled"] == 12 and record["scored"] == 12 and record["train_agreement"] == 1.0
    unlabelled = [r["image"] for r in rows if r["image"] not in labelled]
    flagged = {n for n in unlabelled if rewards_[n] > 0}
    assert flagged == {n for n in unlabelled if red[n]}  # the head extends the labels to the images nobody labelled
    assert all(rewards_[n] == labelled[n] for n in labelled)  # labelled images keep their labels' reward


def test_invert_with_a_reward_model_learns_from_unlabelled_images_and_records_it(tiny_clip, tiny_sd1, tmp_path):
    folder, rows = _shapes_collection(tmp_path)
    _label(folder, {r["image"]: " red " in f" {r['prompt']} " for i, r in enumerate(rows) if i % 6 < 3})
    out = tmp_path / "t.safetensors"
    r = runner.invoke(app, ["feedback", "invert", str(folder), str(tiny_sd1), "--out", str(out), "--steps", "2", "--device", "cpu",
                            "--reward-model", f"clip:{tiny_clip}"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.with_name("t.report.json").read_text())
    assert report["reward"]["source"] == f"clip:{tiny_clip}" and report["reward"]["labelled"] == 12
    assert report["reward"]["flagged_by_head"] == 6  # the 6 unlabelled red images
    assert report["images_used"] == 6 + 6  # the 6 labelled red images and the head's 6
    plain = runner.invoke(app, ["feedback", "invert", str(folder), str(tiny_sd1), "--out", str(tmp_path / "p.safetensors"), "--steps", "2",
                                "--device", "cpu"])
    assert plain.exit_code == 0 and json.loads((tmp_path / "p.report.json").read_text())["reward"] == {"source": "labels"}
    bad = runner.invoke(app, ["feedback", "invert", str(folder), str(tiny_sd1), "--out", str(tmp_path / "b.safetensors"),
                              "--reward-model", "clip:/nonexistent"])
    assert bad.exit_code == 2 and "not a CLIP model folder" in bad.output
