"""The command line: help, version, inspect, and one-line errors with the documented exit codes."""

import hashlib
import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from erase.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("run", "generate", "evaluate", "merge", "inspect"):
        assert cmd in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("erase ")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_inspect_reads_each_family(tiny_files, family):
    r = runner.invoke(app, ["inspect", str(tiny_files[family]), "--json", "--hash"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["family"] == family and info["attn2_tensors"] > 0
    assert info["sha256"] == hashlib.sha256(tiny_files[family].read_bytes()).hexdigest()
    assert info["prediction_type"] == ("v_prediction" if family == "sd2" else "epsilon")


def test_inspect_table_shows_ema_policy(tiny_sd1_fp16_ema):
    r = runner.invoke(app, ["inspect", str(tiny_sd1_fp16_ema)])
    assert r.exit_code == 0 and "EMA" in r.output and "F16" in r.output


def _bad_inputs(tmp_path, tiny_sd1):
    good = tiny_sd1.read_bytes()
    (tmp_path / "folder").mkdir()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 3])
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 40)
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    raw = json.dumps(header).encode()
    (tmp_path / "lying.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + n :])
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(2)}, str(tmp_path / "unknown.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {"x": Evil()}}))
    return ["missing.safetensors", "folder", "trunc.safetensors", "random.safetensors", "lying.safetensors", "unknown.safetensors", "evil.ckpt"]


def test_every_bad_input_gives_one_line_and_exit_1(tmp_path, tiny_sd1):
    for name in _bad_inputs(tmp_path, tiny_sd1):
        r = runner.invoke(app, ["inspect", str(tmp_path / name)])
        assert r.exit_code == 1, (name, r.output)
        assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) <= 2, (name, r.output)
        assert "Traceback" not in r.output and "executed" not in r.output


def test_bad_input_to_run_writes_nothing(tmp_path, tiny_sd1):
    for name in _bad_inputs(tmp_path, tiny_sd1):
        r = runner.invoke(app, ["run", str(tmp_path / name), "--concepts", "x", "--out", str(tmp_path / "o.safetensors")])
        assert r.exit_code == 1, (name, r.output)
        assert not (tmp_path / "o.safetensors").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from erase.errors import EraseError

    missing = str(tmp_path / "missing.safetensors")
    monkeypatch.setenv("ERASE_DEBUG", "0")  # restored after the test: --debug sets it for the process
    plain = runner.invoke(app, ["inspect", missing])  # one line, exit 1: the error became SystemExit
    assert plain.exit_code == 1 and isinstance(plain.exception, SystemExit) and "error:" in plain.output
    for args in (["--debug", "inspect", missing], ["inspect", missing]):  # the flag, then ERASE_DEBUG=1 (which the flag set)
        r = runner.invoke(app, args)
        assert isinstance(r.exception, EraseError), args  # raised through: the traceback is shown


def test_every_declared_method_option_is_a_flag_refused_for_methods_that_do_not_own_it(tiny_sd1, tmp_path):
    """Method options are declared once, on the method configs (erase.methods.options): each becomes an `erase run`
    flag with its owners' defaults in the help, and is a usage error with any other method."""
    from erase.methods import METHODS
    from erase.methods.options import method_options

    declared = method_options(METHODS)
    assert {"eta", "guide", "lam", "robust", "anchor", "concept_mode", "target", "guidance"} <= set(declared)
    assert set(declared["guidance"].defaults) == {"sdd", "esd", "ca"} and declared["guidance"].defaults["ca"] == 6.0
    help_text = runner.invoke(app, ["run", "--help"], terminal_width=200).output
    for opt in declared.values():
        flag = opt.flag.split("/")[0]  # a switch (--pooled/--no-pooled) takes no value
        assert flag in help_text, opt.flag
        other = next(m for m in METHODS if m not in opt.defaults)
        value = [] if opt.type is bool else [opt.choices[0] if opt.choices else {int: "1", float: "1.0", str: "x"}[opt.type]]
        r = runner.invoke(app, ["run", str(tiny_sd1), "-c", "cat", "--method", other, flag, *value, "-o", str(tmp_path / "o.safetensors")])
        assert r.exit_code == 2 and f"{flag} does not apply to --method {other}" in r.output, (opt.flag, r.output)
