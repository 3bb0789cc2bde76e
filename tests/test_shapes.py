"""The shapes world: deterministic renders, an accurate detector, the committed model."""

import json
from pathlib import Path

import numpy as np
import pytest

from erase.shapes import COLOURS, SHAPES, ShapesDetector, render, sample_world, to_tensor

MODEL = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "shapes-sd.safetensors"
RECORD = Path(__file__).resolve().parent.parent / "benchmarks" / "shapes.json"
# The end-to-end erasure of this suite is `make demo`'s: UCE with the default preservation (seconds). Recorded on the
# benchmark protocol (benchmarks/shapes.json, row "UCE circle (defaults: --preserve auto)"): circle 1.00 -> 0.00, the
# other shapes' mean accuracy 0.84 -> 0.81. A trained erasure of the shapes model takes minutes to tens of minutes on
# two cores, so SDD's, ESD's and CA's shapes-world results are measured by benchmarks/shapes.py, not here.
CIRCLE_AFTER = 0.15  # the base's unconditional circle rate (0.104) plus 5 points: what "erased" means on this model
OTHERS_KEPT = 0.85  # of the base's mean accuracy on the other shapes


def test_world_generator_is_deterministic():
    a, sa = sample_world(20, seed=3)
    b, sb = sample_world(20, seed=3)
    c, _ = sample_world(20, seed=4)
    assert np.array_equal(a, b) and sa == sb and not np.array_equal(a, c)


def test_detector_is_accurate_on_fresh_renders():
    rng = np.random.default_rng(12345)  # not the training seed
    truth = [(SHAPES[i % 6], list(COLOURS)[(i // 6) % 6]) for i in range(180)]
    labels = ShapesDetector().classify(to_tensor([render(s, c, rng) for s, c in truth]))
    shape_acc = np.mean([lab[0] == s for lab, (s, _) in zip(labels, truth)])
    colour_acc = np.mean([lab[1] == c for lab, (_, c) in zip(labels, truth)])
    assert shape_acc >= 0.97 and colour_acc >= 0.97


def test_committed_model_loads_through_the_normal_checkpoint_path():
    from erase.models import open_model

    model = open_model(MODEL)
    assert model.family.name == "sd1" and model.default_resolution == 32
    assert list(model.load_unet().config.block_out_channels) == [64, 128]


def test_evaluate_with_the_shapes_detector_reports_accuracy_per_prompt_shape(tmp_path):
    import json

    from typer.testing import CliRunner

    from erase.cli import app

    args = ["evaluate", str(MODEL), "--base", str(MODEL), "--detector", "shapes", "--target", "circle", "--prompts", "builtin:shapes",
            "--n", "2", "--steps", "6", "--guidance", "5", "--batch", "72", "--device", "cpu", "--out", str(tmp_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "shape accuracy by prompt shape" in r.output and "colour fidelity" in r.output
    report = json.loads((tmp_path / "report.json").read_text())
    base, same = report["base_results"], report["erased"]
    assert set(same["shape_accuracy"]) == set(SHAPES)
    assert same["shape_accuracy"] == base["shape_accuracy"]  # one model, same seeds: same images
    assert same["shape_accuracy"]["circle"] >= 0.75  # the base model draws circles (1.00 at 20 steps)
    # report.html carries the same per-shape table, base beside erased, with intervals, and per-prompt rates
    page = (tmp_path / "report.html").read_text()
    table = page.split("shape accuracy by prompt shape", 1)[1].split("</table>", 1)[0]
    assert "<th>base</th><th>erased</th>" in table
    for shape in SHAPES:
        lo, hi = same["shape_accuracy_ci95"][shape]
        assert f"<td>{shape}</td>" in table and f"[{lo:.3f}, {hi:.3f}]" in table
    assert "flagged rate per prompt" in page and "a red circle" in page.split("flagged rate per prompt", 1)[1]


def test_training_script_refuses_a_stage_output_made_with_other_settings(tmp_path):
    import importlib.util
    import json

    import torch
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("shapes_train", MODEL.parent / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    f = tmp_path / "vae.safetensors"
    assert not train.reusable(f, {"steps": 800})
    save_file({"w": torch.zeros(1)}, str(f), metadata={"recipe": json.dumps({"steps": 20})})
    assert train.reusable(f, {"steps": 20})
    with pytest.raises(SystemExit, match="made with"):
        train.reusable(f, {"steps": 800})


@pytest.mark.slow
def test_default_uce_erasure_removes_circles_and_keeps_the_other_shapes(tmp_path):
    """`make demo` end to end: erase "circle" with UCE at the defaults, measure base and erased with the detector."""
    from rich.console import Console

    from erase.evaluate.shapes_world import Protocol, measure
    from erase.run import RunOptions, erase_concepts

    out = tmp_path / "erased.safetensors"
    erase_concepts(RunOptions(model=MODEL, concepts=["circle"], out=out, method="uce"), Console(quiet=True), progress=False)
    # the base as the benchmark recorded it (48 images per shape; another CPU may differ by an image or two, which the
    # margins absorb); the erased model measured here on 12 images per shape: the margins (0 circles, 0.83 of 0.84) are wide
    base = next(r for r in json.loads(RECORD.read_text())["rows"] if r["row"] == "base")["metrics"]
    erased = measure(out, ["circle"], Protocol(seeds=2, unconditional=4))
    print(f"circle {base['target_presence']:.2f} -> {erased['target_presence']:.2f}; others' mean "
          f"{_mean(base['others_accuracy']):.2f} -> {_mean(erased['others_accuracy']):.2f}")
    assert base["target_presence"] >= 0.9
    assert erased["target_presence"] <= CIRCLE_AFTER
    assert _mean(erased["others_accuracy"]) >= OTHERS_KEPT * _mean(base["others_accuracy"])


def _mean(rates: dict) -> float:
    return sum(rates.values()) / len(rates)


def test_every_prompted_image_of_the_protocol_is_a_different_image():
    from erase.evaluate.shapes_world import Protocol, protocol_jobs

    asked = protocol_jobs(Protocol(seeds=3, templates=("a {colour} {shape}", "a {shape}")))
    jobs = [(job.prompt, job.seed) for job, *_ in asked]
    assert len(jobs) == 2 * 6 * 6 * 3 and len(set(jobs)) == len(jobs)
    assert sum(colour is None for _, _, colour, _ in asked) == 6 * 6 * 3  # the colourless wording: 18 images per shape


def _metrics(accuracy: dict, *, colour: float = 1.0, uncond: float = 0.10, drawn: dict | None = None) -> dict:
    return {"targets": ["circle"], "target_presence": accuracy["circle"], "unconditional_rate": uncond,
            "unconditional": {"circle": uncond, "square": 0.2, "star": 0.3},
            "per_shape": {s: {"accuracy": a, "colour_fidelity": colour} for s, a in accuracy.items()},
            "target_drawn": drawn or {}}


def test_verdict_holds_every_other_shape_to_ninety_percent_of_its_base_and_presence_to_the_unconditional_rate():
    from erase.evaluate.shapes_world import verdict

    base = _metrics({"circle": 1.0, "square": 0.80, "star": 0.50})
    kept = verdict(_metrics({"circle": 0.15, "square": 0.72, "star": 0.60}), base)  # square at exactly 90 %, presence 0.10 + 0.05
    assert kept["all"] and kept["kept_worst"] == "square" and kept["kept_min"] == pytest.approx(0.9)
    short = verdict(_metrics({"circle": 0.16, "square": 0.71, "star": 0.60}, colour=0.94), base)
    assert short["met"] == {"presence": False, "kept": False, "colour": False} and not short["all"]
    anchor = verdict(_metrics({"circle": 0.0, "square": 0.8, "star": 0.5}, drawn={"square": 0.59}), base, anchor="square")
    assert anchor["met"]["anchor"] is False and not anchor["all"]
    # two erased shapes: each is held to its own unconditional rate (square 0.20 + 0.05), not to the pair's pooled presence
    pair = _metrics({"circle": 0.0, "square": 0.30, "star": 0.50})
    pair["targets"], pair["target_presence"] = ["circle", "square"], 0.15
    both = verdict(pair, base)
    assert both["presence_max"] == pytest.approx({"circle": 0.15, "square": 0.25}) and both["met"]["presence"] is False
    pair["per_shape"]["square"]["accuracy"] = 0.25
    assert verdict(pair, base)["met"]["presence"] is True
    # a shape the base never draws on its prompts (the shapes-world FLUX.1's squares) has nothing to keep: left out
    weak = _metrics({"circle": 1.0, "square": 0.0, "star": 0.50})
    judged = verdict(_metrics({"circle": 0.0, "square": 0.0, "star": 0.45}), weak)
    assert judged["kept_worst"] == "star" and judged["kept_min"] == pytest.approx(0.9) and judged["met"]["kept"]


def test_demo_table_names_the_target_it_misses():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", MODEL.parent.parent / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    base = _metrics({"circle": 1.0, "square": 0.80, "star": 0.50})
    assert "Targets: every one met" in demo.table(base, _metrics({"circle": 0.0, "square": 0.80, "star": 0.50}))
    missed = demo.table(base, _metrics({"circle": 0.0, "square": 0.68, "star": 0.50}))
    assert "missed: other shapes kept" in missed and "square at 85% of base" in missed


def test_measure_reports_each_batch_as_it_is_drawn():
    from erase.evaluate.shapes_world import Protocol, measure

    seen = []
    measure(MODEL, ["circle"], Protocol(seeds=1, unconditional=4, steps=2, batch=16), on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(16, 40), (32, 40), (40, 40)]  # 36 prompted + 4 unconditional images, in batches of 16
