"""examples/shapes/configs/*.toml: one file per row of the README's method table. Each loads with `erase run --config`,
names only options `erase run` has, and gives exactly the options benchmarks/shapes.py trains that row with."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erase.cli import app

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "examples" / "shapes" / "configs").glob("*.toml"))
MODEL = ROOT / "examples" / "shapes" / "shapes-sd.safetensors"


def _shapes_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("shapes_bench", ROOT / "benchmarks" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options_from_the_cli(config: Path, monkeypatch, tmp_path):
    """The RunOptions `erase run MODEL --config CONFIG` builds (the erasure itself is not run)."""
    import erase.run

    seen = []
    monkeypatch.setattr(erase.run, "erase_concepts", lambda opts, console, **kw: seen.append(opts) or {"output": None})
    r = CliRunner().invoke(app, ["run", str(MODEL), "--config", str(config), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    return seen[0]


def _resolved(opts):
    """What the run will use: the method's config with its defaults and the preservation defaults filled in."""
    from erase.engine.preserve import parse_preserve
    from erase.methods import METHODS
    from erase.run import preserving_defaults

    cfg_cls = METHODS[opts.method][1]
    return cfg_cls(**{**preserving_defaults(cfg_cls, parse_preserve(opts.preserve, None)), **opts.method_config})


def test_every_row_config_has_its_benchmark_row():
    assert {c.stem for c in CONFIGS} == set(_shapes_benchmark().CONFIG_ROWS)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_a_config_gives_the_options_its_benchmark_row_trains_with(config, monkeypatch, tmp_path):
    bench = _shapes_benchmark()
    cli = _options_from_the_cli(config, monkeypatch, tmp_path)
    row = bench.row_options(MODEL, ["circle"], tmp_path, **bench.CONFIG_ROWS[config.stem])
    assert (cli.method, cli.concepts, cli.preserve, cli.preserve_weight, cli.device) == (row.method, row.concepts, row.preserve,
                                                                                         row.preserve_weight, row.device)
    assert _resolved(cli) == _resolved(row)
    if cli.method != "uce":  # trained: every training setting too
        for field in ("train", "train_set", "resolution", "precision", "preserve_per_step", "adversarial", "batch_size"):
            assert getattr(cli, field) == getattr(row, field), field
    assert dataclasses.asdict(cli).keys() == dataclasses.asdict(row).keys()
