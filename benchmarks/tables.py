"""The docs' tables of measurements, generated from the JSON records the benchmark scripts wrote.

    python benchmarks/tables.py           rewrite every generated block in README.md and benchmarks/README.md
    python benchmarks/tables.py --check   exit 1 when a block differs from what its record gives

A block is the lines between `<!-- table:NAME ... -->` and `<!-- /table:NAME -->`. Edit a number by re-running the
script that records it, then this; never by hand (tests/test_docs.py fails when a block and its record disagree, and
when a table of numbers sits outside a block).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DOCS = (ROOT / "README.md", BENCH / "README.md")
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+)[^\n]*-->\n)(?P<body>(?:.*?\n)?)(<!-- /table:(?P=name) -->)", re.S)


def script(name: str, folder: Path = BENCH):
    """A benchmark script (or examples/demo.py) as a module: their tables are pure functions of the record, and nothing
    heavy is imported."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))  # the scripts import each other by name (sweep.py imports shapes)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def record(name: str) -> dict:
    return json.loads((BENCH / f"{name}.json").read_text())


def shapes_rows() -> dict[str, dict]:
    return {r["row"]: r for r in record("shapes")["rows"]}


# The README's method table: every row that has a config (examples/shapes/configs/NAME.toml), beside the base model and
# SLD (inference-time guidance: `erase generate --safety sld-max`, no checkpoint and so no config). Bold: erase run's
# defaults for that method.
METHOD_ROWS = [
    ("base", None, "base"),
    ("SDD reference (300 steps, `--preserve none`)", "sdd-reference", None),
    ("**SDD, default preservation**", "sdd", None),
    ("SDD, preservation with the EMA teacher's latents (the default before issue 36)", "sdd-teacher", None),
    ("SDD, the same, `--train xattn-kv` (2000 steps)", "sdd-kv", None),
    ("UCE reference (`--preserve none`)", "uce-reference", None),
    ("**UCE, default preservation**", "uce", None),
    ("ESD-x reference (300 steps, lr 1e-4)", "esd-x", None),
    ("ESD-u reference (300 steps, lr 1e-4)", "esd-u", None),
    ("ESD-x, default preservation (300 steps, lr 1e-4)", "esd-x-preserving", None),
    ("CA circle -> square, `--preserve none` (400 steps, lr 1e-3)", "ca", None),
    ("CA circle -> square, default preservation, `--prior-weight 1` (400 steps, lr 3e-4)", "ca-preserving", None),
    ("SLD sld-max (inference-time guidance)", None, "SLD sld-max, concept 'circle'"),
]


def methods_table() -> str:
    shapes, rows = script("shapes"), shapes_rows()
    base = rows["base"]["metrics"]["per_shape"]
    head = "| erasing circle | config | circle | " + " | ".join(s for s in base if s != "circle")
    lines = [head + " | others kept, min (% of base) | min colour | uncond. circle / none | UNet evals/step |", "|---" * (len(base) + 6) + "|"]
    for label, config, row in METHOD_ROWS:
        r = rows[row or shapes.CONFIG_ROW_NAMES[config]]
        m = r["metrics"]
        ps = m["per_shape"]
        kept = min(ps[s]["accuracy"] / base[s]["accuracy"] for s in ps if s != "circle")
        colour = min(v["colour_fidelity"] for v in ps.values())
        evals = r["unet_evals_per_step"]
        evals = "-" if evals is None else "0 (closed form)" if evals == 0 else f"{evals:.1f}"
        cfg = f"`{config}.toml`" if config else "-"
        lines.append(f"| {label} | {cfg} | " + " | ".join(f"{v['accuracy']:.2f}" for v in ps.values())
                     + f" | {100 * kept:.0f}% | {colour:.2f} | {m['unconditional_rate']:.2f} / {m['unconditional']['none']:.2f} | {evals} |")
    return "\n".join(lines)


def demo_table() -> str:
    """`make demo`'s table: the base and the demo's config measured as the demo measures them (its seeds), which are the
    sweeps record's points of that config at that many seeds (`benchmarks/sweep.py --config NAME --seeds N`)."""
    demo, points = script("demo", ROOT / "examples"), record("sweeps")["points"]

    def point(config: str) -> dict:
        found = [p for p in points if p["config"] == config and not p["set"] and p.get("seeds") == demo.SEEDS]
        if not found:
            raise SystemExit(f"benchmarks/sweeps.json has no point for {config} at {demo.SEEDS} seeds: "
                             f"python benchmarks/sweep.py --config {config} --seeds {demo.SEEDS}")
        return found[0]["metrics"]

    return demo.table(point("base"), point(demo.CONFIG.stem))


def shapes_table(part: str):
    return lambda: script("shapes").tables(record("shapes")["rows"])[part]


GENERATORS = {
    "methods": methods_table,
    "demo": demo_table,
    **{f"shapes-{part}": shapes_table(part) for part in ("calibration", "rows", "per_shape", "drawn", "mechanism", "wording")},
    "attack": lambda: script("attack").table(record("attack")["rows"]),
    "hfi": lambda: script("hfi").table(record("hfi")),
    "scale": lambda: script("scale").table(record("scale")),
    "contention": lambda: script("contention").table(record("contention")["cells"]),
    "targets": lambda: script("sweep").targets_table(shapes_rows()["base"]["metrics"]),
    "sweeps": lambda: script("sweep").table(record("sweeps")["points"], shapes_rows()["base"]),
    "real_size": lambda: script("real_size").table(record("real_size")),
    "real_size_bound": lambda: "```\n" + script("real_size").bound_lines(record("real_size")) + "\n```",
    "sdd_cost": lambda: script("sdd_cost").table(record("sdd_cost")),
    "sdd_default_cost": lambda: script("sdd_cost").default_table(record("sdd_cost")),
    "sdd_shapes_cost": lambda: script("sdd_cost").shapes_table(record("sdd_cost")),
    # no record until a GPU has run `make gpu-check`: the table says so
    "gpu_check": lambda: script("gpu_check").table(record("gpu_check") if (BENCH / "gpu_check.json").exists() else {}),
    "transformer_memory": lambda: script("transformer_memory").table(record("transformer_memory")),
    "transformer_run": lambda: script("transformer_run").table(record("transformer_run")),
    "flux_methods": lambda: script("shapes_flux").table(record("shapes_flux")),
    "flux_calibration": lambda: script("shapes_flux").calibration_table(record("shapes_flux")),
    "flux_dev_agreement": lambda: script("shapes_flux").agreement_table(record("shapes_flux_dev")),
    "flux_dev_calibration": lambda: script("shapes_flux").calibration_table(record("shapes_flux_dev")),
    "flux_dev_methods": lambda: script("shapes_flux").table(record("shapes_flux_dev")),
    "write_speed": lambda: "```\n" + script("write_speed").table(record("write_speed")) + "\n```",
}


def update(text: str) -> str:
    """Every block of a doc replaced by its generator's output."""
    return BLOCK.sub(lambda m: m.group(1) + GENERATORS[m["name"]]().strip() + "\n" + m.group(4), text)


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m["name"], m["body"].strip()) for m in BLOCK.finditer(text)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report blocks that differ from their records")
    args = ap.parse_args()
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = update(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        raise SystemExit(f"out of date with their records: {', '.join(map(str, stale))} (run python benchmarks/tables.py)")
    print("updated: " + ", ".join(map(str, stale)) if stale else "every generated table matches its record")


if __name__ == "__main__":
    main()
