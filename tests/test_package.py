"""The built wheel is complete: everything the package opens at run time ships in it and is found there."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What the installed package must do from the wheel alone: every built-in prompt set, the shapes detector's weights,
# each family's configs and tokenizers (the editable install of `make test` would find them in the source tree).
USE_EVERY_DATA_FILE = """
import erase, sys
from pathlib import Path
assert Path(erase.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), erase.__file__
from erase.prompts import builtin_names, load_prompts
names = builtin_names()
assert {"nudity", "neutral", "shapes"} <= set(names), names
assert all(load_prompts("builtin:" + n) for n in names)
from erase.shapes import ShapesDetector
ShapesDetector()
from erase.models import load_tokenizer
from erase.checkpoint.model_config import _carried
for family, parts in {"sd1": ["tokenizer"], "sd2": ["tokenizer"], "sdxl": ["tokenizer", "tokenizer_2"]}.items():
    for part in parts:
        load_tokenizer(family, part)
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        _carried(family, component)
print("ok")
"""


def _data_files() -> set[str]:
    """Every non-Python file in the source package, as a wheel path (erase/...)."""
    pkg = ROOT / "erase"
    return {str(p.relative_to(ROOT)) for p in pkg.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
            and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    # build from a clean copy: setuptools' build/ folder in the checkout could hold files the tree no longer has
    shutil.copytree(ROOT / "erase", src / "erase", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = out.glob("erase-*.whl")
    return path


def test_wheel_holds_every_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        inside = set(z.namelist())
    missing = sorted(_data_files() - inside)
    assert not missing, missing
    assert "erase/assets/shapes_detector.safetensors" in inside and "erase/assets/prompts/nudity.csv" in inside


def test_installed_wheel_finds_its_files_without_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", USE_EVERY_DATA_FILE, str(target)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
