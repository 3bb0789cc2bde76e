"""`erase evaluate`: detectors, counting, the CI gate, preservation, reports."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from erase.cli import app
from erase.evaluate import detectors
from erase.evaluate.detectors import NudeNetDetector
from erase.evaluate.metrics import preservation
from erase.evaluate.runner import wilson
from erase.prompts import load_prompts

runner = CliRunner()
FAST = ["--steps", "2", "--size", "32", "--device", "cpu", "--limit", "2"]


def test_nudenet_runs_offline_on_a_synthetic_image(tmp_path):
    pytest.importorskip("nudenet")
    p = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 64, 3), 180, np.uint8)).save(p)
    assert NudeNetDetector().score([p], ["x"]) == [{"flagged": False, "classes": []}]


class StubBackend:
    def __init__(self, per_file):
        self.per_file = per_file

    def detect(self, path):
        return self.per_file[path.rsplit("/", 1)[-1]]


def test_counting_uses_threshold_and_only_exposed_classes_flag(tmp_path):
    backend = StubBackend({
        "a.png": [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7}],
        "b.png": [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5}],  # below 0.6
        "c.png": [{"class": "FEET_EXPOSED", "score": 0.9}, {"class": "FACE_FEMALE", "score": 0.9}],  # reported, not flagged
    })
    det = NudeNetDetector(threshold=0.6, backend=backend)
    scores = det.score([tmp_path / n for n in ("a.png", "b.png", "c.png")], ["p"] * 3)
    assert [s["flagged"] for s in scores] == [True, False, False]
    assert scores[2]["classes"] == ["FEET_EXPOSED"]
    assert NudeNetDetector(threshold=0.4, backend=backend).score([tmp_path / "b.png"], ["p"])[0]["flagged"]


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi and 0.2 < lo < 0.25
    assert wilson(0, 16)[0] == 0.0 and wilson(0, 16)[1] < 0.25


def test_preservation_of_identical_images_is_perfect(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    same = preservation(paths, paths)
    assert same["ssim_mean"] == pytest.approx(1.0) and same["psnr_mean"] == 100.0
    assert preservation(paths, paths[::-1])["ssim_mean"] < 0.5


def test_i2p_category_filter(tmp_path):
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,categories,sd_seed,sd_guidance_scale\nx,\"sexual, violence\",5,7\ny,hate,6,8\n")
    assert [s.prompt for s in load_prompts(csv, category="sexual")] == ["x"]
    assert load_prompts(csv)[1].seed == 6 and load_prompts(csv)[1].guidance == 8.0
    assert len(load_prompts("builtin:nudity")) == 50


def _flag_everything(monkeypatch):
    class Always(NudeNetDetector):
        def score(self, paths, prompts):
            return [{"flagged": True, "classes": ["FEMALE_BREAST_EXPOSED"]} for _ in paths]

    monkeypatch.setitem(detectors.DETECTORS, "nudenet", Always)


def test_gate_exit_codes(tiny_sd1, tmp_path, monkeypatch):
    r = runner.invoke(app, ["evaluate", str(tiny_sd1), *FAST, "--out", str(tmp_path / "a"), "--fail-above", "0.5"])
    assert r.exit_code == 0, r.output
    _flag_everything(monkeypatch)
    r = runner.invoke(app, ["evaluate", str(tiny_sd1), *FAST, "--out", str(tmp_path / "a"), "--fail-above", "0.5"])
    assert r.exit_code == 3 and "gate failed" in r.output
    assert runner.invoke(app, ["evaluate", str(tiny_sd1), *FAST, "--fail-above", "2"]).exit_code == 2


def test_report_files_and_fields_and_image_reuse(tiny_sd1, tmp_path):
    out = tmp_path / "ev"
    args = ["evaluate", str(tiny_sd1), "--base", str(tiny_sd1), *FAST, "--out", str(out), "--json", str(tmp_path / "r.json")]
    assert runner.invoke(app, args).exit_code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("model_sha256", "settings", "erased", "base_results", "preservation", "versions", "detector", "threshold"):
        assert key in report, key
    for key in ("flagged_rate", "flagged_rate_ci95", "class_counts", "per_prompt_rate"):
        assert key in report["erased"], key
    assert report["preservation"]["ssim_mean"] == pytest.approx(1.0)
    assert (out / "report.html").exists() and (out / "report.json").exists()
    page = (out / "report.html").read_text()  # NudeNet: the per-class and per-prompt tables, base beside erased
    per_class = page.split("images with each detected class", 1)[1].split("</table>", 1)[0]
    assert "<th>base</th><th>erased</th>" in per_class and "FEMALE_BREAST_EXPOSED" in per_class
    first_prompt = next(iter(report["erased"]["per_prompt"]))
    assert first_prompt in page.split("flagged rate per prompt", 1)[1]
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p.parent.name in ("base", "erased")}
    assert runner.invoke(app, args).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in first} == first  # images with matching parameters are not regenerated


def test_prompts_longer_than_77_tokens_are_reported_not_refused(tiny_sd1, tmp_path):
    long_prompt = " ".join(["a very detailed photograph of a cat"] * 20)  # 141 tokens
    prompts = tmp_path / "p.txt"
    prompts.write_text(long_prompt + "\n")
    r = runner.invoke(app, ["evaluate", str(tiny_sd1), "--prompts", str(prompts), *FAST, "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "is 142 tokens" in r.output and "first 77" in r.output
    assert json.loads((tmp_path / "e" / "report.json").read_text())["truncated_prompts"] == {long_prompt: 142}
    r = runner.invoke(app, ["generate", str(tiny_sd1), "-p", long_prompt, *FAST[:-2], "--out", str(tmp_path / "g")])
    assert r.exit_code == 0 and "is 142 tokens" in r.output
    r = runner.invoke(app, ["generate", str(tiny_sd1), "-p", "a cat", *FAST[:-2], "--out", str(tmp_path / "g2")])
    assert r.exit_code == 0 and "warning" not in r.output
