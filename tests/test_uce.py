"""UCE (`erase run --method uce`): the closed form, its normal equations, identity, surgical output."""

import json

import pytest
import torch
from typer.testing import CliRunner

from erase.checkpoint.formats import open_checkpoint
from erase.cli import app
from erase.methods.uce import UCE, UCEConfig
from erase.models import open_model
from erase.vocabulary import Vocabulary

runner = CliRunner()
VOCAB = Vocabulary("test", ["cat", "dog", "tree"], ["{}", "a photo of a {}", "a {colour} {}"], {"colour": ["red", "blue"]})


def _uce(model, concepts, preserve=("", "dog"), **cfg):
    text = model.load_text_encoder()
    return UCE(UCEConfig(**cfg), list(concepts), preserve=list(preserve), vocab=VOCAB, tokenizer=text.tokenizers[0],
               encode=lambda prompts: text.encode(prompts).embeds)


def _kv(model):
    names = [n for n in model.unet_param_names() if UCE.edits(n)]
    return {n: model.ckpt.get(model.unet_file_key(n)) for n in names}


def test_solution_satisfies_its_normal_equations(tiny_sd1):
    model = open_model(tiny_sd1)
    uce = _uce(model, ["cat"])
    A, B, info = uce.system()
    weights = _kv(model)
    new, report = uce.solve(weights)
    assert info["erase_prompts"] == 4 and info["preserve_prompts"] == 5  # 1 + 1 + 2 colours each; "" and dog's 4
    assert report["normal_equation_residual"] < 1e-9 and report["condition_number"] >= 1
    for n, w in weights.items():  # W' B = W A, the stationarity condition of the least-squares objective
        lhs, rhs = new[n].double() @ B, w.double() @ A
        assert torch.allclose(lhs, rhs, rtol=1e-5, atol=1e-5 * rhs.abs().max().item()), n


def test_erased_tokens_move_towards_the_guide_and_preserved_ones_stay(tiny_sd1):
    model = open_model(tiny_sd1)
    uce = _uce(model, ["cat"], lam=0.5)
    text = model.load_text_encoder()
    cat, guide, dog = (text.encode([p]).embeds[0, 5:].double() for p in ("a photo of a cat", "a photo of a", "a photo of a dog"))
    weights = _kv(model)
    new, _ = uce.solve(weights)
    for n, w in weights.items():
        w, w2 = w.double(), new[n].double()
        before, after = (w @ cat.T - w @ guide.T).norm(), (w2 @ cat.T - w @ guide.T).norm()
        assert after < 0.5 * before, n  # "a photo of a cat" now reads like "a photo of a"
        assert (w2 @ dog.T - w @ dog.T).norm() < 0.5 * (w2 @ cat.T - w @ cat.T).norm(), n  # dog moved much less


def test_nothing_to_erase_is_the_identity_bytes_unchanged(tiny_sd1_fp16_ema, tmp_path):
    from erase.checkpoint.write import write_checkpoint

    model = open_model(tiny_sd1_fp16_ema)
    weights = _kv(model)
    new, info = _uce(model, []).solve(weights)
    assert info["erase_vectors"] == 0
    out = write_checkpoint(model.ckpt, tmp_path / "same.safetensors", {model.unet_file_key(n): v for n, v in new.items()}, metadata={})
    a, b = open_checkpoint(tiny_sd1_fp16_ema), open_checkpoint(out)
    for k in weights:
        key = model.unet_file_key(k)
        assert torch.equal(a.get(key), b.get(key)) and b.tensors[key].dtype == "F16"


def test_cli_uce_changes_only_attn2_keys_and_values(tiny_sd1_fp16_ema, tmp_path):
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["run", str(tiny_sd1_fp16_ema), "--method", "uce", "-c", "cat", "--preserve", "dog, tree",
                            "--vocabulary", "builtin:general", "-o", str(out), "--delta", str(tmp_path / "d.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output  # --device applies to UCE: its text encoder runs there
    src, dst = open_checkpoint(tiny_sd1_fp16_ema), open_checkpoint(out)
    changed = {k for k in dst.keys() if not torch.equal(src.get(k), dst.get(k))}
    kv = {k for k in src.keys() if k.startswith("model.diffusion_model.") and (".attn2.to_k." in k or ".attn2.to_v." in k)}
    assert changed == kv
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["method"] == "uce" and report["solve"]["condition_number"] > 1 and report["unet_evals_per_step"] == 0
    assert report["device"] == "cpu"
    assert report["preserve"]["concepts"] == ["", "dog", "tree"] and dst.metadata["erase.method"] == "uce"
    assert dst.metadata["erase.preserve"] == json.dumps(["", "dog", "tree"])
    merged = tmp_path / "m.safetensors"  # its delta merges like any other
    assert runner.invoke(app, ["merge", str(tiny_sd1_fp16_ema), str(tmp_path / "d.safetensors"), "-o", str(merged)]).exit_code == 0


@pytest.mark.parametrize("args,flag", [(["--method", "uce", "--steps", "5"], "--steps"), (["--method", "uce", "--reuse", "2"], "--reuse"),
                                       (["--guide", "art"], "--guide"), (["--lambda", "1"], "--lambda"), (["--robust", "2"], "--robust")])
def test_options_of_another_method_are_refused(tiny_sd1, tmp_path, args, flag):
    r = runner.invoke(app, ["run", str(tiny_sd1), "-c", "cat", *args, "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 2 and f"{flag} does not apply" in r.output
    assert not (tmp_path / "o.safetensors").exists()


def test_rece_embedding_solves_its_normal_equations_layer_by_layer():
    from erase.methods.uce import adversarial_embeddings

    g = torch.Generator().manual_seed(0)
    W = [torch.randn(o, 6, generator=g, dtype=torch.float64) for o in (5, 7, 4)]
    M = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    C = torch.randn(3, 6, generator=g, dtype=torch.float64)
    G = sum(w.T @ w for w in W)
    c_star = adversarial_embeddings(M, G, C, 0.1)
    edited = [w @ M for w in W]
    H = sum(e.T @ e for e in edited)
    mu = 0.1 * torch.trace(H) / 6
    for c, cs in zip(C, c_star):  # (sum_l W'_l^T W'_l + mu I) c* = sum_l W'_l^T W_l c
        lhs = H @ cs + mu * cs
        rhs = sum(e.T @ w @ c for e, w in zip(edited, W))
        assert torch.allclose(lhs, rhs, atol=1e-9)


def test_a_rece_round_erases_the_embedding_that_undid_the_edit(tiny_sd1):
    model = open_model(tiny_sd1)
    weights = _kv(model)
    plain, _ = _uce(model, ["cat"]).solve(weights)
    robust, info = _uce(model, ["cat"], robust=2, robust_lambda=0.01).solve(weights)
    assert any(not torch.equal(plain[n], robust[n]) for n in weights)
    for r in info["robust_rounds"]:
        # c* brings back nearly all of the concept's keys and values through the edit; once it is erased too, the part it
        # cannot bring back is several times larger (tiny random encoder: the edit itself moves the outputs by ~2 %)
        assert 1 - r["restored_after"] > 3 * (1 - r["restored_before"]), r
        assert r["normal_equation_residual"] < 1e-9
    assert [r["round"] for r in info["robust_rounds"]] == [1, 2]


def test_balance_holds_the_preserved_concept_the_edit_moved_most_harder(tiny_sd1):
    """--balance 1: each preserved concept's weight is its movement over the least-moved concept's, so the neighbour the
    edit reaches most is held hardest (and moves less after the second solve) while none drops below the plain weight."""
    from erase.methods.uce import moved

    model = open_model(tiny_sd1)
    weights = _kv(model)
    plain = _uce(model, ["cat"], preserve=("", "dog", "tree"))
    _, before = plain.solve(weights)
    _, after = _uce(model, ["cat"], preserve=("", "dog", "tree"), balance=1).solve(weights)
    rnd = after["balance_rounds"][0]
    assert rnd["moved_before"] == pytest.approx(before["preserved_moved"])
    most = max(rnd["moved_before"], key=rnd["moved_before"].get)
    assert min(rnd["weights"].values()) == pytest.approx(1.0) and max(rnd["weights"], key=rnd["weights"].get) == most
    assert after["preserved_moved"][most] < before["preserved_moved"][most]
    eye = torch.eye(4, dtype=torch.float64)
    assert moved(eye, eye, eye) == 0.0  # the identity edit moves nothing
