"""The docs' numbers come from records a script wrote: each generated table in the README equals the table its script
prints from the recorded JSON (edit the record by re-running the script, never the README by hand)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_robustness_table_is_the_one_benchmarks_attack_prints_from_its_record():
    attack = _module(ROOT / "benchmarks" / "attack.py")
    rows = json.loads((ROOT / "benchmarks" / "attack.json").read_text())["rows"]
    for doc in ("README.md", "benchmarks/README.md"):
        text = (ROOT / doc).read_text()
        block = text.split(attack.README_START, 1)[1].split(attack.README_END, 1)[0].split("\n", 1)[1].strip()
        assert block == attack.table(rows).strip(), doc
    names = {r["row"] for r in rows}
    assert len(names) == len(rows) and all(r["attack"]["cases"] == 12 for r in rows if r["row"] != "base")
