"""The shapes world: deterministic renders, an accurate detector, the committed model."""

from pathlib import Path

import numpy as np

from erase.shapes import COLOURS, SHAPES, ShapesDetector, render, sample_world, to_tensor

MODEL = Path(__file__).resolve().parent.parent / "examples" / "shapes" / "shapes-sd.safetensors"


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
