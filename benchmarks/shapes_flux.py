"""The shapes-world FLUX.1-architecture model: its calibration and the methods table, on the UNet table's protocol.

    python benchmarks/shapes_flux.py [--seeds 8] [--only uce] [--work DIR] [--attack]

The model is examples/shapes/shapes-flux.safetensors (Black Forest Labs' layout, transformer only) with its diffusers
folder examples/shapes/shapes-flux/ as `--text-encoders` (built from the shapes SD file by `examples/shapes/train_flux.py
--folder-only` when missing). Each erased row is `erase run MODEL --text-encoders FOLDER --config
examples/shapes/configs/flux/NAME.toml`, run through the CLI itself, then measured like benchmarks/shapes.py's rows
(erase.evaluate.shapes_world.measure: 8 seeds x 6 colours per shape, 20 Euler steps, CFG 5) and judged against the same
targets (the base's unconditional circle rate + 0.05; every other shape at 90 % of its base accuracy; colour 0.95).
Writes benchmarks/shapes_flux.json; `python benchmarks/tables.py` puts its tables in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shapes.py's calibration table (also when tables.py loads this)
ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes"
MODEL, FOLDER, CONFIGS = SHAPES / "shapes-flux.safetensors", SHAPES / "shapes-flux", SHAPES / "configs" / "flux"

# (row, config name or None for the base model); the configs say what each row is
ROWS = [
    ("base", None),
    ("**SDD, erase run's defaults**: keys and values and the pooled embedder (`text-kv`), no inner attack", "sdd"),
    ("SDD, the same with the shared inner attack (`--adversarial`)", "sdd-adversarial"),
    ("SDD, the text stream's keys and values alone (`--train xattn-kv`)", "sdd-kv"),
    ("SDD, the whole text-stream attention (`--train xattn`)", "sdd-xattn"),
    ("UCE reference (`--preserve none`), on the text and the pooled embedders", "uce-reference"),
    ("**UCE, default preservation**, on the text and the pooled embedders", "uce"),
    ("UCE, default preservation, on the text embedder alone (`--no-pooled`)", "uce-text"),
    ("Concept Ablation, circle -> star, default preservation, prior term, `text-kv`", "ca"),
]


def ensure_folder() -> None:
    """The text encoders, VAE and scheduler folder: repackaged from the shapes SD file (seconds), not stored twice."""
    if not (FOLDER / "model_index.json").is_file():
        subprocess.run([sys.executable, str(SHAPES / "train_flux.py"), "--folder-only"], check=True)


def erase(config: str, work: Path) -> tuple[Path, dict]:
    """`erase run` on the model with the row's config, in a subprocess as a user runs it; the output and its run report."""
    from erase.checkpoint.write import report_path

    out = work / f"flux-{config}.safetensors"
    if not (out.exists() and report_path(out).exists()):
        subprocess.run([sys.executable, "-m", "erase", "run", str(MODEL), "--text-encoders", str(FOLDER), "--config",
                        str(CONFIGS / f"{config}.toml"), "-o", str(out), "--force"], check=True)
    return out, json.loads(report_path(out).read_text())


def table(record: dict) -> str:
    """The methods table of the FLUX.1 shapes model, each row judged against the targets from its own base row."""
    from erase.evaluate.shapes_world import verdict

    rows = record["rows"]
    base = rows[0]["metrics"]
    shapes = list(base["per_shape"])
    lines = [f"| erasing circle ({record['protocol']['seeds'] * 6} images per shape) | config | " + " | ".join(shapes)
             + " | others kept, min (% of base) | min colour | uncond. circle / none | evals/step | train s | targets met "
             "| ASR UnlearnDiffAtk / CCE (12 cases) |", "|---|---|" + "---|" * len(shapes) + "---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        ps = m["per_shape"]
        kept = min(ps[s]["accuracy"] / base["per_shape"][s]["accuracy"] for s in ps  # shapes the base draws (not square here)
                   if s not in r["targets"] and base["per_shape"][s]["accuracy"] > 0)
        colour = min(v["colour_fidelity"] for v in ps.values())
        evals = "-" if r["config"] is None else ("0 (closed form)" if not r["unet_evals_per_step"] else f"{r['unet_evals_per_step']:.1f}")
        secs = "-" if not r["train_seconds"] else f"{r['train_seconds']:.0f}"
        if r["config"] is None:
            met = "-"
        else:
            v = verdict(m, base)
            met = "all" if v["all"] else "misses " + ", ".join(k for k, ok in v["met"].items() if not ok)
        config = "-" if r["config"] is None else f"`flux/{r['config']}.toml`"
        lines.append(f"| {r['row']} | {config} | "
                     + " | ".join(f"{ps[s]['accuracy']:.2f}" for s in shapes)
                     + f" | {100 * kept:.0f}% | {colour:.2f} | {m['unconditional']['circle']:.2f} / {m['unconditional']['none']:.2f} | "
                     f"{evals} | {secs} | {met} | {asr(r.get('attack'))} |")
    return "\n".join(lines)


def asr(attacked: dict | None) -> str:
    if not attacked:
        return "-"
    return " / ".join(f"{attacked[a]['asr']:.2f}" for a in ("unlearndiffatk", "cce"))


def calibration_table(record: dict) -> str:
    from shapes import calibration

    return "\n".join(calibration(record["rows"][0]["metrics"]))


def merge(into: Path, others: list[Path]) -> None:
    """Rows measured apart (the same protocol) joined into one record, in ROWS' order; a row in several keeps the last."""
    record = json.loads(into.read_text())
    by_name = {r["row"]: r for r in record["rows"]}
    for other in others:
        theirs = json.loads(other.read_text())
        if theirs["protocol"] != record["protocol"]:
            raise SystemExit(f"{other}: measured with another protocol than {into}")
        by_name.update({r["row"]: r for r in theirs["rows"]})
    record["rows"] = [by_name[name] for name, _ in ROWS if name in by_name]
    into.write_text(json.dumps(record, indent=2))
    print(f"{len(record['rows'])} rows in {into}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "shapes_flux.json")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per (shape, colour) prompt")
    ap.add_argument("--only", action="append", default=[], help="run only the row of this config (or 'base'); others keep their "
                    "recorded results")
    ap.add_argument("--work", type=Path, help="train into this folder and reuse an output already there")
    ap.add_argument("--merge", type=Path, nargs="+", help="add the rows of these records (rows run apart, in parallel, with "
                    "their own --json) to --json, in the table's order; run nothing")
    ap.add_argument("--attack", action="store_true", help="also attack each erased row measured (benchmarks/attack.py's 12 cases: "
                    "UnlearnDiffAtk and CCE on 'a <colour> circle' x 2 seeds)")
    args = ap.parse_args()
    if args.merge:
        merge(args.json, args.merge)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erase.engine.threads import configure_threads

    configure_threads()
    from shapes import train_seconds

    from erase.evaluate.shapes_world import Protocol, measure

    ensure_folder()
    protocol = Protocol(seeds=args.seeds)
    work = args.work or Path(tempfile.mkdtemp(prefix="erase-shapes-flux-"))
    work.mkdir(parents=True, exist_ok=True)
    recorded = {r["row"]: r for r in json.loads(args.json.read_text())["rows"]} if args.json.exists() else {}
    if recorded and json.loads(args.json.read_text())["protocol"]["seeds"] != args.seeds:
        raise SystemExit(f"--seeds {args.seeds}: {args.json} was measured with another protocol; its rows must match")
    rows = []
    for name, config in ROWS:
        if args.only and (config or "base") not in args.only:
            if name in recorded:
                rows.append(recorded[name])
            continue
        path, report = (MODEL, None) if config is None else erase(config, work)
        t = time.perf_counter()
        m = measure(path, ["circle"], protocol, text_encoders=FOLDER)
        m.pop("samples")
        row = {"row": name, "config": config, "targets": ["circle"], "metrics": m, "measure_seconds": time.perf_counter() - t,
               "unet_evals_per_step": report["unet_evals_per_step"] if report else None,
               "train_seconds": train_seconds(report), "report": report}
        if args.attack and config is not None:
            from attack import attack

            row["attack"] = attack(path, MODEL, work, text_encoders=FOLDER)
        rows.append(row)
        print(f"done: {name}", flush=True)
        done = {r["row"] for r in rows}  # after every row, with the recorded rows still to come: a stopped run keeps both
        later = [recorded[n] for n, _ in ROWS if n in recorded and n not in done]
        args.json.write_text(json.dumps({"protocol": vars(protocol), "model": MODEL.name, "rows": rows + later}, indent=2))
    record = {"protocol": vars(protocol), "model": MODEL.name, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2))
    print(calibration_table(record))
    print()
    print(table(record))


if __name__ == "__main__":
    main()
