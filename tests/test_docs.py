"""The docs' numbers come from records a script wrote: every table of measurements in README.md and benchmarks/README.md is
a block that benchmarks/tables.py generates from a JSON record under benchmarks/ (edit the record by re-running its
script, then `python benchmarks/tables.py`; never the docs by hand)."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "benchmarks/README.md")
# Tables of words, not measurements (their digits are settings or citations): recognised by their header line.
DESCRIPTIVE = (
    "| method | what it does | cost |",  # the methods and the papers' own step counts
    "| reference | erase | why |",  # SDD as published vs erase's engine
)
COMMANDS = ("$", "#", "erase", "python", "pip", "make", "accelerate", "torchrun", "git", "cd", "export", "HF_", "OMP_")  # code lines that are commands


@pytest.fixture(scope="module")
def tables():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", DOCS)
def test_every_generated_table_is_the_one_its_record_gives(tables, doc):
    found = tables.blocks((ROOT / doc).read_text())
    assert found, doc
    for name, body in found:
        assert body == tables.GENERATORS[name]().strip(), f"{doc}: table {name} differs from its record (python benchmarks/tables.py)"


def test_every_generator_appears_in_the_docs(tables):
    used = {name for doc in DOCS for name, _ in tables.blocks((ROOT / doc).read_text())}
    assert used == set(tables.GENERATORS)


@pytest.mark.parametrize("doc", DOCS)
def test_no_table_of_numbers_lies_outside_a_generated_block(tables, doc):
    text = tables.BLOCK.sub("", (ROOT / doc).read_text())
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # command lines and their output quoted as code: see below
    for table in re.findall(r"(?:^\|.*\n)+", text, flags=re.M):
        header = table.splitlines()[0]
        assert header in DESCRIPTIVE or not re.search(r"\d", table), f"{doc}: a table of numbers without a record:\n{table}"


@pytest.mark.parametrize("doc", DOCS)
def test_quoted_script_output_is_generated_too(tables, doc):
    """A script's printed output quoted in a code block carries numbers as much as a table does."""
    text = tables.BLOCK.sub("", (ROOT / doc).read_text())
    for code in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        code = re.sub(r"\\\n", " ", code)  # a command continued over lines is one command
        numbers = [line for line in code.splitlines() if re.search(r"\d\.\d", line) and not line.split()[0].startswith(COMMANDS)]
        assert not numbers, f"{doc}: measured output quoted without a record: {numbers}"


def test_the_robustness_record_attacked_every_row_on_the_same_cases():
    rows = json.loads((ROOT / "benchmarks" / "attack.json").read_text())["rows"]
    names = {r["row"] for r in rows}
    assert len(names) == len(rows) and all(r["attack"]["cases"] == 12 for r in rows if r["row"] != "base")


def test_a_table_out_of_step_with_its_record_is_found(tables):
    """The check itself: a hand-edited number in a generated block is a difference."""
    doc = (ROOT / "README.md").read_text()
    name, body = next((n, b) for n, b in tables.blocks(doc) if "0." in b)  # a block with a number to edit
    edited = doc.replace(body, body.replace("0.", "9.", 1), 1)
    assert tables.update(edited) != edited and tables.update(doc) == doc


# Decimals in prose that are not measurements: arXiv ids, version numbers, CUDA compute capabilities.
NOT_MEASURED = re.compile(r"arXiv \d+\.\d+|\d+\.\d+\.\d+|capability \d+\.\d+|Python \d+\.\d+")


def _recorded_forms() -> set[str]:
    """Every number of every record under benchmarks/, as the docs may print it: 1-3 decimals, a percentage, millions,
    GB / GiB / MiB."""
    forms = set()
    for record in (ROOT / "benchmarks").glob("*.json"):
        for m in re.finditer(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", record.read_text()):
            v = float(m.group())
            for x in (v, 100 * v, v / 1e6, v / 1e9, v / 2**30, v / 2**20):
                forms.update(f"{x:.{d}f}" for d in (0, 1, 2, 3))
    return forms


@pytest.mark.parametrize("doc", DOCS)
def test_every_decimal_in_the_prose_is_a_recorded_number(tables, doc):
    """A number written in the text (a reading of a table, a memory peak) must be one a record holds, or one of the tables
    generated into the same page. Integers are not checked (step counts, seeds and sizes are settings). A weak check
    for two-decimal rates, which some record holds by chance; it catches stale readings and numbers nothing recorded."""
    text = (ROOT / doc).read_text()
    generated = " ".join(body for _, body in tables.blocks(text))
    prose = NOT_MEASURED.sub("", re.sub(r"```.*?```", "", tables.BLOCK.sub("", text), flags=re.S))
    recorded = _recorded_forms()
    unsourced = [n for n in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose) if n not in generated and n not in recorded]
    assert not unsourced, f"{doc}: numbers with no record: {unsourced}"
