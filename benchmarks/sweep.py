"""Settings sweeps on the shapes model: a config row with some options changed, trained and measured like a table row.

    python benchmarks/sweep.py --config ca-preserving --set lr=3e-4 [--set variant=noise ...] [--json benchmarks/sweeps.json]

Each point is trained by `erase run`'s own code path (benchmarks/shapes.py's erase_row, the options of
examples/shapes/configs/NAME.toml changed by --set), measured with the table's protocol (16 seeds x 6 colours per shape,
the shapes detector) and appended to the record with the targets it meets. Points already recorded with the same
settings are skipped, so a stopped sweep continues where it stopped. `--table` prints the record as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from shapes import CONFIG_ROWS, ROOT, erase_row

# The targets of the methods issue (27): the base's unconditional circle rate (0.104) + 5 points; every other shape keeps
# 90 % of its base accuracy; colour fidelity 0.95; Concept Ablation's circle prompts draw the anchor 0.6 of the time.
PRESENCE_MAX, KEPT_MIN, COLOUR_MIN, ANCHOR_MIN = 0.154, 0.90, 0.95, 0.60


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def verdict(metrics: dict, base: dict, anchor: str | None) -> dict:
    """Which targets a measured point meets (the table's numbers, computed the same way)."""
    targets = metrics["targets"]
    kept = {s: v["accuracy"] / base["per_shape"][s]["accuracy"] for s, v in metrics["per_shape"].items() if s not in targets}
    colour = min(v["colour_fidelity"] for v in metrics["per_shape"].values())
    met = {"presence": metrics["target_presence"] <= PRESENCE_MAX, "kept": min(kept.values()) >= KEPT_MIN, "colour": colour >= COLOUR_MIN}
    if anchor:
        met["anchor"] = metrics["target_drawn"].get(anchor, 0.0) >= ANCHOR_MIN
    return {"met": met, "all": all(met.values()), "kept_min": min(kept.values()), "kept_worst": min(kept, key=kept.get), "colour_min": colour}


def table(points: list[dict]) -> str:
    lines = ["| config | changed | circle presence | anchor drawn | kept (min, shape) | min colour | targets met | other wordings: circle, "
             "kept (min, shape) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        v, m = p["verdict"], p["metrics"]
        changed = ", ".join(f"{k}={val}" for k, val in p["set"].items()) or "(as the config)"
        anchor = f"{m['target_drawn'].get(p['anchor'], 0):.2f}" if p.get("anchor") else "-"
        met = "all" if v["all"] else "missed: " + ", ".join(k for k, ok in v["met"].items() if not ok)
        w = p.get("wording_verdict")
        wording = f"{p['wording']['target_presence']:.2f}, {w['kept_min']:.2f} ({w['kept_worst']})" if w else "-"
        lines.append(f"| {p['config']} | {changed} | {m['target_presence']:.2f} | {anchor} | {v['kept_min']:.2f} ({v['kept_worst']}) | "
                     f"{v['colour_min']:.2f} | {met} | {wording} | {p['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a row of benchmarks/shapes.py's CONFIG_ROWS (examples/shapes/configs/NAME.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one option of the row (repeatable)")
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "shapes" / "shapes-sd.safetensors")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "sweeps.json")
    ap.add_argument("--wording", action="store_true", help="also measure the ten-wording protocol (shapes.py's other wordings)")
    ap.add_argument("--table", action="store_true", help="print the recorded points and exit")
    args = ap.parse_args()
    points = json.loads(args.json.read_text())["points"] if args.json.exists() else []
    if args.table:
        print(table(points))
        return
    changes = {k.replace("-", "_"): parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    if any(p["config"] == args.config and p["set"] == changes and (p.get("wording") or not args.wording) for p in points):
        print("already recorded; skipped")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erase.engine.threads import configure_threads

    configure_threads()
    from erase.evaluate.shapes_world import UNSEEN_TEMPLATES, Protocol, measure
    from erase.shapes import TEMPLATES

    shapes_record = json.loads((ROOT / "benchmarks" / "shapes.json").read_text())
    base = next(r for r in shapes_record["rows"] if r["row"] == "base")["metrics"]
    options = {**CONFIG_ROWS[args.config], **changes}
    work = Path(tempfile.mkdtemp(prefix="erase-sweep-"))
    t = time.perf_counter()
    path, report = erase_row(args.model, ["circle"], work, **options)
    train_seconds = time.perf_counter() - t
    metrics = measure(path, ["circle"], Protocol(**shapes_record["protocol"]))
    metrics.pop("samples")
    anchor = options.get("anchor")
    point = {"config": args.config, "set": changes, "anchor": anchor, "metrics": metrics, "verdict": verdict(metrics, base, anchor),
             "train_seconds": train_seconds, "unet_evals_per_step": report["unet_evals_per_step"], "run_report": report.get("solve")}
    if args.wording:  # every caption template the model knows and four it never saw, 2 seeds per prompt, as shapes.py
        wording = measure(path, ["circle"], Protocol(seeds=2, templates=tuple(TEMPLATES) + UNSEEN_TEMPLATES))
        wording.pop("samples")
        base_wording = next(r for r in shapes_record["rows"] if r["row"] == "base")["wording"]
        point["wording"] = wording
        point["wording_verdict"] = verdict(wording, base_wording, anchor)
    points = json.loads(args.json.read_text())["points"] if args.json.exists() else []  # another sweep may have written meanwhile
    points = [p for p in points if not (p["config"] == args.config and p["set"] == changes)]  # measured again: this one replaces it
    args.json.write_text(json.dumps({"protocol": shapes_record["protocol"], "points": points + [point]}, indent=2) + "\n")
    print(table([point]))


if __name__ == "__main__":
    main()
