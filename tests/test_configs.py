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
    """What the run will use: the method's config with its defaults and the preservation defaults filled in (and, in
    `opts`, the run options the method decides: retain prompts per step, pairs, the inner attack)."""
    from erase.engine.preserve import parse_preserve
    from erase.methods import METHODS
    from erase.run import preserving_defaults, resolve_run_defaults

    method_cls, cfg_cls = METHODS[opts.method]
    spec = parse_preserve(opts.preserve, None)
    resolve_run_defaults(opts, method_cls, spec)
    return cfg_cls(**{**preserving_defaults(cfg_cls, spec, method_cls, opts.method_config), **opts.method_config})


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
        for field in ("train", "train_set", "resolution", "precision", "preserve_per_step", "preserve_paired", "adversarial", "batch_size"):
            assert getattr(cli, field) == getattr(row, field), field
    assert dataclasses.asdict(cli).keys() == dataclasses.asdict(row).keys()


def test_the_sdd_config_is_erase_runs_default_at_the_shapes_scale(monkeypatch, tmp_path):
    """sdd.toml writes out what `erase run` does unasked: only the scale settings (steps, lr, EMA, resolution) differ."""
    import erase.run

    seen = []
    monkeypatch.setattr(erase.run, "erase_concepts", lambda opts, console, **kw: seen.append(opts) or {"output": None})
    scale = ["--concepts", "circle", "--steps", "1000", "--lr", "0.001", "--ema-decay", "0.995", "--resolution", "32", "--device", "cpu",
             "--precision", "fp32"]
    r = CliRunner().invoke(app, ["run", str(MODEL), *scale, "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    plain, config = seen[0], _options_from_the_cli(CONFIGS[[c.stem for c in CONFIGS].index("sdd")], monkeypatch, tmp_path)
    assert _resolved(plain) == _resolved(config)
    for field in ("train", "train_set", "preserve", "preserve_per_step", "preserve_paired", "adversarial"):
        assert getattr(plain, field) == getattr(config, field), field


FLUX_CONFIGS = sorted((ROOT / "examples" / "shapes" / "configs" / "flux").glob("*.toml"))


def test_every_flux_row_has_its_config_and_the_flux_sdd_config_is_the_unets_but_two_measured_defaults(monkeypatch, tmp_path):
    """benchmarks/shapes_flux.py's rows each run a config of examples/shapes/configs/flux/, and flux/sdd.toml is sdd.toml
    (erase run's default at the shapes scale) but for what erase run picks on SD3 / FLUX.1 when not told: the trainable
    set text-kv and no inner attack."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("shapes_flux_bench", ROOT / "benchmarks" / "shapes_flux.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert {c for _, c in bench.ROWS if c} == {c.stem for c in FLUX_CONFIGS}
    unet = _options_from_the_cli(CONFIGS[[c.stem for c in CONFIGS].index("sdd")], monkeypatch, tmp_path)
    flux = _options_from_the_cli(FLUX_CONFIGS[[c.stem for c in FLUX_CONFIGS].index("sdd")], monkeypatch, tmp_path)
    assert _resolved(unet) == _resolved(flux)
    for field in ("train", "resolution", "precision", "preserve", "preserve_per_step", "preserve_paired", "concepts"):
        assert getattr(unet, field) == getattr(flux, field), field
    assert unet.adversarial is not None and flux.adversarial is None
    assert (unet.train_set, flux.train_set) == ("xattn-kv", "text-kv")
