"""Settings sweeps on the shapes model: a config row with some options changed, trained and measured like a table row.

    python benchmarks/sweep.py --config ca-preserving --set lr=3e-4 [--set variant=noise ...] [--json benchmarks/sweeps.json]
    python benchmarks/sweep.py --config sdd --concepts "square" --seeds 24 --wording --wording-seeds 4 --attack-seeds 6

Each point is trained by `erase run`'s own code path (benchmarks/shapes.py's erase_row, the options of
examples/shapes/configs/NAME.toml changed by --set, erasing --concepts instead of the config's circle when given),
measured with the table's protocol (8 seeds x 6 colours per shape, or --seeds; the shapes detector), attacked with
`--attack-seeds N` (benchmarks/attack.py's UnlearnDiffAtk and CCE on each erased shape's 6 colours x N seeds) and
appended to the record. Points already recorded with the same settings are
skipped, so a stopped sweep continues where it stopped. `--table` prints the record as a Markdown table, each point
judged against the targets; `--merge` adds the points of sweeps run on another --json (several at once).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from shapes import CONFIG_ROWS, ROOT, erase_row
from shapes import train_seconds as shapes_train_seconds

# the targets (issue 27) and the verdict against them live with the measurement, so that `make demo` judges the same way
from erase.evaluate.shapes_world import ANCHOR_MIN, COLOUR_MIN, KEPT_MIN, PRESENCE_MARGIN, verdict


def parse_value(text: str):
    if text.startswith("{"):  # a dict option: adversarial={"steps": 0, "lr": 0.01}
        return json.loads(text)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def settable(method: str) -> set[str]:
    """The keys --set may change: benchmarks/shapes.py's row options and the method's own config fields."""
    import dataclasses
    import inspect

    from shapes import row_options

    from erase.methods import METHODS

    return (set(inspect.signature(row_options).parameters) - {"model", "concepts", "work", "method_options"}) | \
        {f.name for f in dataclasses.fields(METHODS[method][1])}


def targets_table(base: dict) -> str:
    """The targets, from the base row's own rates."""
    lines = ["| target | from the base model | value |", "|---|---|---|",
             f"| circle presence, at most | unconditional circle rate {base['unconditional_rate']:.3f} + {PRESENCE_MARGIN:.2f} | "
             f"{base['unconditional_rate'] + PRESENCE_MARGIN:.3f} |"]
    for s, v in base["per_shape"].items():
        if s != "circle":
            lines.append(f"| {s} accuracy, at least | {100 * KEPT_MIN:.0f}% of {v['accuracy']:.3f} | {KEPT_MIN * v['accuracy']:.3f} |")
    lines += [f"| colour fidelity, at least | - | {COLOUR_MIN:.2f} |", f"| CA: circle prompts drawing the anchor, at least | - | {ANCHOR_MIN:.2f} |"]
    return "\n".join(lines)


ASR_MAX = 0.25  # an erasure holds when neither attack brings the concept back in more than a quarter of the cases (issue 36)


def holds(point: dict) -> bool | None:
    """Whether every attack on every erased shape stayed at or under ASR_MAX; None when the point was not attacked."""
    attacks = point.get("attack")
    if not attacks:
        return None
    return all(r[a]["asr"] <= ASR_MAX + 1e-9 for r in attacks["by_concept"].values() for a in ("unlearndiffatk", "cce"))


def asr_text(point: dict) -> str:
    attacks = point.get("attack")
    if not attacks:
        return "-"
    parts = [f"{c}: {r['unlearndiffatk']['asr']:.2f} / {r['cce']['asr']:.2f}" for c, r in attacks["by_concept"].items()]
    return ", ".join(parts) + f" ({attacks['cases']} cases each)"


def concepts_of(point: dict) -> list[str]:
    return point.get("concepts", ["circle"])


def table(points: list[dict], base: dict, recorded: list[dict] | None = None) -> str:
    """The points as Markdown, each judged against `base` (the base row of benchmarks/shapes.json, as recorded now), or
    against a base point measured with the same --seeds, found among `recorded` (default: `points`)."""
    lines = ["| config | erased | changed | presence | anchor drawn | kept (min, shape) | min colour | ASR UnlearnDiffAtk / CCE | targets met "
             "| other wordings: presence, kept (min, shape) | UNet evals / step | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    recorded = points if recorded is None else recorded
    same_protocol = {p["seeds"]: p for p in recorded if p["config"] == "base" and p.get("seeds")}  # a base measured with more seeds
    same_wording = {p["wording_seeds"]: p for p in recorded if p["config"] == "base" and p.get("wording_seeds", 2) != 2}
    for p in points:
        judge = same_protocol.get(p.get("seeds"), base)
        judge_wording = same_wording.get(p.get("wording_seeds"), base)
        m, v = p["metrics"], verdict(p["metrics"], judge["metrics"], p.get("anchor"))
        changed = ", ".join(f"{k}={val}" for k, val in p["set"].items()) or "(as the config)"
        if p.get("seeds"):
            changed += f" ({6 * p['seeds']} images per shape)"
        if p.get("wording_seeds", 2) != 2:
            changed += f" (other wordings: {60 * p['wording_seeds']} per shape)"
        anchor = f"{m['target_drawn'].get(p['anchor'], 0):.2f}" if p.get("anchor") else "-"
        met_by = {**v["met"], **({"holds": holds(p)} if holds(p) is not None else {})}
        met = "(what the others are judged against)" if p["config"] == "base" else \
            "all" if all(met_by.values()) else "missed: " + ", ".join(k for k, ok in met_by.items() if not ok)
        if p.get("wording"):
            w = verdict(p["wording"], judge_wording["wording"], p.get("anchor"))
            wording = f"{p['wording']['target_presence']:.2f}, {w['kept_min']:.2f} ({w['kept_worst']})"
        else:
            wording = "-"
        evals = f"{p['unet_evals_per_step']:.1f}" if p.get("unet_evals_per_step") else "-"
        lines.append(f"| {p['config']} | {', '.join(concepts_of(p))} | {changed} | {m['target_presence']:.2f} | {anchor} | "
                     f"{v['kept_min']:.2f} ({v['kept_worst']}) | {v['colour_min']:.2f} | {asr_text(p)} | {met} | {wording} | {evals} | "
                     f"{p['train_seconds']:.0f} |")
    return "\n".join(lines)


def base_row() -> dict:
    return next(r for r in json.loads((ROOT / "benchmarks" / "shapes.json").read_text())["rows"] if r["row"] == "base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a row of benchmarks/shapes.py's CONFIG_ROWS (examples/shapes/configs/NAME.toml), or base "
                    "(the input model, measured on the same protocol)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change one option of the row (repeatable)")
    ap.add_argument("--concepts", default="circle", help="the shapes to erase, comma-separated (default: circle, as every config row)")
    ap.add_argument("--attack-seeds", type=int, default=0, help="also attack each erased shape (UnlearnDiffAtk and CCE as benchmarks/"
                    "attack.py runs them) on its 6 colours x N seeds (0: no attack; 2 is attack.py's 12 cases)")
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "shapes" / "shapes-sd.safetensors")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "sweeps.json")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per (shape, colour) prompt (default: the table's protocol, 8)")
    ap.add_argument("--wording", action="store_true", help="also measure the ten-wording protocol (shapes.py's other wordings)")
    ap.add_argument("--wording-seeds", type=int, default=2, help="seeds per prompt of the ten-wording protocol (shapes.py: 2)")
    ap.add_argument("--work", type=Path, help="train into this folder and reuse a point's checkpoint already there (an earlier "
                    "sweep's, shapes.py's or attack.py's --work), e.g. to measure it again with more --seeds (default: a new "
                    "temporary folder)")
    ap.add_argument("--table", action="store_true", help="print the recorded points and exit")
    ap.add_argument("--merge", type=Path, action="append", default=[], help="add the points of another sweep record (one run on "
                    "another --json) to --json and exit; a point with the same settings is replaced")
    args = ap.parse_args()
    points = json.loads(args.json.read_text())["points"] if args.json.exists() else []
    if args.table:
        print(table(points, base_row()))
        return
    if args.merge:
        key = lambda p: json.dumps([p["config"], p["set"], p.get("seeds"), p.get("wording_seeds", 2), concepts_of(p)])  # noqa: E731
        merged = {key(p): p for p in points}
        for other in args.merge:
            merged.update({key(p): p for p in json.loads(other.read_text())["points"]})
        record = json.loads((ROOT / "benchmarks" / "shapes.json").read_text())
        args.json.write_text(json.dumps({"protocol": record["protocol"], "points": list(merged.values())}, indent=2) + "\n")
        print(f"{len(merged)} points in {args.json}")
        return
    changes = {k.replace("-", "_"): parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    same = lambda p: (p["config"] == args.config and p["set"] == changes and p.get("seeds") == args.seeds  # noqa: E731
                      and p.get("wording_seeds", 2) == args.wording_seeds and concepts_of(p) == concepts)
    measured = next((p for p in points if same(p)), None)
    if measured is not None and (measured.get("wording") or not args.wording) and \
            (measured.get("attack", {}).get("seeds") == args.attack_seeds or not args.attack_seeds):
        print("already recorded; skipped")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erase.engine.threads import configure_threads

    configure_threads()
    from erase.evaluate.shapes_world import UNSEEN_TEMPLATES, Protocol, measure
    from erase.shapes import TEMPLATES

    shapes_record = json.loads((ROOT / "benchmarks" / "shapes.json").read_text())
    options = {**CONFIG_ROWS.get(args.config, {}), **changes}
    if args.config != "base":  # a misspelt key would otherwise fail after the model is loaded, as a method config's TypeError
        known = settable(options.get("method", "sdd"))
        if unknown := sorted(set(changes) - known):
            raise SystemExit(f"--set {', '.join(unknown)}: not an option of a {args.config} row; one of {', '.join(sorted(known))}")
    if args.config == "base":  # the input model itself: what the targets are measured against, on the same protocol
        path, report = args.model, {"unet_evals_per_step": None}
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="erase-sweep-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"training into {work}", flush=True)
        path, report = erase_row(args.model, concepts, work=work, reuse_trained=args.work is not None, progress=True, **options)
    train_seconds = 0.0 if args.config == "base" else shapes_train_seconds(report)  # the input model: nothing trained
    protocol = {**shapes_record["protocol"], **({"seeds": args.seeds} if args.seeds else {})}
    metrics = measure(path, concepts, Protocol(**protocol))
    metrics.pop("samples")
    anchor = options.get("anchor")
    point = {"config": args.config, "set": changes, "concepts": concepts, "seeds": args.seeds, "anchor": anchor, "metrics": metrics,
             "train_seconds": train_seconds, "unet_evals_per_step": report["unet_evals_per_step"], "run_report": report.get("solve")}
    if measured is not None and measured["metrics"] == metrics:  # the same checkpoint measured again: keep what it had
        point = {**measured, **point, "attack": measured.get("attack"), "wording": measured.get("wording")}
    if args.wording and not point.get("wording"):  # every caption template the model knows and four it never saw, as shapes.py
        wording = measure(path, concepts, Protocol(seeds=args.wording_seeds, templates=tuple(TEMPLATES) + UNSEEN_TEMPLATES))
        wording.pop("samples")
        point["wording"], point["wording_seeds"] = wording, args.wording_seeds
    if args.attack_seeds and (point.get("attack") or {}).get("seeds") != args.attack_seeds:
        from attack import attack

        by_concept = {c: attack(path, args.model, work, concept=c, n=args.attack_seeds) for c in concepts}
        point["attack"] = {"seeds": args.attack_seeds, "cases": 6 * args.attack_seeds, "by_concept": by_concept}
    points = json.loads(args.json.read_text())["points"] if args.json.exists() else []  # another sweep may have written meanwhile
    points = [p for p in points if not same(p)]  # measured again: this one replaces it
    args.json.write_text(json.dumps({"protocol": shapes_record["protocol"], "points": points + [point]}, indent=2) + "\n")
    # judged against a base measured with the same seeds: in this record, or in the project's when --json is another
    main_record = ROOT / "benchmarks" / "sweeps.json"
    others = json.loads(main_record.read_text())["points"] if args.json.resolve() != main_record.resolve() and main_record.exists() else []
    print(table([point], base_row(), recorded=others + points + [point]))


if __name__ == "__main__":
    main()
