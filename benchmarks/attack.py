"""Robustness in the shapes world: does "circle" come back under UnlearnDiffAtk and CCE, method by method?

    python benchmarks/attack.py [--json benchmarks/attack.json] [--only NAME ...]

Every row is trained here, by `erase run`'s own code path (benchmarks/shapes.py's `erase_row`, the same settings as
that table's rows of the same name), then:
  - measured on the shapes protocol (erase.evaluate.shapes_world, 8 seeds x 6 colours per shape): circle presence,
    every other shape's accuracy, colour fidelity;
  - attacked with `erase attack`'s runner on "a <colour> circle" x 6 colours x 2 seeds = 12 cases, with BASE's images
    as UnlearnDiffAtk's targets and 25 BASE images of circles for CCE. Images: DDIM 20 steps, CFG 5 (the protocol's).
    UnlearnDiffAtk: 3 prefix tokens, at most 200 steps per case (argmax drawn every 40); CCE: 400 inversion steps.
Rates carry 95% Wilson intervals; 12 cases make them wide (one case is 8 points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

ATTACK = {"n": 2, "sample_steps": 20, "guidance": 5.0, "uda_steps": 200, "cce_steps": 400, "cce_images": 25}


def rows(model: Path, reuse_trained: bool = False):
    """(name, make(work) -> (checkpoint, run report or None)) for every row."""
    from shapes import CONFIG_ROW_NAMES, CONFIG_ROWS, erase_row

    def erased(**kw):
        return lambda work: erase_row(model, ["circle"], work, reuse_trained, **kw)

    def config(name):  # a row of benchmarks/shapes.py's table, trained from its config
        return CONFIG_ROW_NAMES[name], erased(**CONFIG_ROWS[name])

    return [
        ("base", lambda work: (model, None)),
        config("uce-reference"),
        config("uce"),
        *((f"UCE circle, --robust {n}", erased(method="uce", preserve="auto", robust=n)) for n in (1, 3)),
        ("SDD circle (300 steps), --reuse 8, --preserve none", erased(**CONFIG_ROWS["sdd-reference"])),
        config("sdd"),
        config("sdd-teacher"),
        config("sdd-kv"),
        config("esd-x"),
        config("esd-x-preserving"),
        config("ca"),
        config("ca-preserving"),
        # adversarial training: the inner attack at 10 warm-started steps, lr 1e-2 (AdvUnlearn: 30 at 1e-3). On UCE's erasure of
        # this model, 30 steps at 1e-3 bring the prediction's distance to the input model's circle from 0.065 to 0.023, and
        # 10 steps at 1e-2 to 0.010 (tests/test_adversarial.py), at a third of the inner cost
        ("SDD circle, preserving, --adversarial (10 inner steps, lr 0.01), lr 0.001, --reuse 8, 1000 steps",
         erased(**CONFIG_ROWS["sdd-adversarial"])),
        ("ESD-x circle, preserving, --adversarial (10 inner steps, lr 0.01), lr 0.0001, --reuse 8, 300 steps",
         erased(**CONFIG_ROWS["esd-x-adversarial"])),
    ]


def attack(path: Path, base: Path, work: Path, concept: str = "circle", n: int = ATTACK["n"], text_encoders: Path | None = None) -> dict:
    """Both attacks on `concept`'s prompts of builtin:shapes ("a <colour> <concept>"), `n` seeds each (6 x n cases);
    `text_encoders`: the folder a transformer-only file draws with (the shapes-world FLUX.1)."""
    from erase.attack.cce import CCEConfig
    from erase.attack.runner import AttackOptions, run_attack
    from erase.attack.unlearndiffatk import UnlearnDiffAtkConfig
    from erase.generate import GenSettings

    opts = AttackOptions(erased=path, concept=concept, out=work / f"attack-{path.stem}-{concept}-n{n}", base=base, n=n, seed=0,
                         settings=GenSettings(steps=ATTACK["sample_steps"], guidance=ATTACK["guidance"], batch=16, device="cpu"),
                         uda=UnlearnDiffAtkConfig(steps=ATTACK["uda_steps"]),
                         cce=CCEConfig(steps=ATTACK["cce_steps"], images=ATTACK["cce_images"]), text_encoders=text_encoders, force=True)
    report = run_attack(opts)
    keep = ("successes", "asr", "asr_ci95", "broken_by_attack", "unet_evals_per_prompt", "seconds")
    out = {"pre_attack": report["pre_attack"], "cases": report["cases_total"], "seconds": report["seconds_this_session"]}
    for name, r in report["results"].items():
        out[name] = {k: r[k] for k in keep if k in r}
    out["cce"]["inversion_seconds"] = report["results"]["cce"]["token"]["seconds"]
    out["unlearndiffatk"]["steps_per_case"] = [c["unlearndiffatk"]["steps"] for c in report["cases"] if "unlearndiffatk" in c]
    out["unlearndiffatk"]["prefixes"] = [c["unlearndiffatk"]["prefix_text"] for c in report["cases"] if "unlearndiffatk" in c]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "shapes" / "shapes-sd.safetensors")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "attack.json")
    ap.add_argument("--only", action="append", default=[], help="run only rows whose name contains this; others keep their record")
    ap.add_argument("--work", type=Path, help="train into this folder and reuse a row's checkpoint already there, as shapes.py "
                    "--work leaves them (default: a new temporary folder)")
    ap.add_argument("--table", action="store_true", help="print the table of the recorded --json; run nothing (benchmarks/tables.py "
                    "writes it into the docs)")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())["rows"]))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from erase.engine.threads import configure_threads

    configure_threads()
    from erase.evaluate.shapes_world import Protocol, measure

    protocol = Protocol(seeds=8)
    from shapes import train_seconds

    work = args.work or Path(tempfile.mkdtemp(prefix="erase-attack-"))
    work.mkdir(parents=True, exist_ok=True)
    recorded = {r["row"]: r for r in json.loads(args.json.read_text())["rows"]} if args.json.exists() else {}
    done = []

    def save(rows: list[dict]) -> None:
        args.json.write_text(json.dumps({"attack_settings": ATTACK, "protocol": vars(protocol), "rows": rows}, indent=2))

    for name, make in rows(args.model, reuse_trained=args.work is not None):
        if args.only and not any(o in name for o in args.only):
            if name in recorded:
                done.append(recorded[name])
            continue
        path, report = make(work)
        m = measure(path, ["circle"], protocol)
        others = m["others_accuracy"]
        row = {"row": name, "train_seconds": train_seconds(report),
               "unet_evals_per_step": None if report is None else report["unet_evals_per_step"],
               "circle_presence": m["target_presence"], "circle_presence_ci95": m["target_presence_ci95"], "others_accuracy": others,
               "min_colour_fidelity": min(v["colour_fidelity"] for v in m["per_shape"].values()),
               "robust_rounds": (report or {}).get("solve", {}).get("robust_rounds"),
               "attack": attack(path, args.model, work)}
        done.append(row)
        print(f"done: {name}", flush=True)
        save(done)  # after every row: a long run that stops keeps what it measured
    save(done)  # and at the end: recorded rows after the last one measured
    print(table(done))


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["row"] == "base")["others_accuracy"]
    lines = ["| row | circle, plain prompts (95% CI) | ASR UnlearnDiffAtk (95% CI) | ASR CCE (95% CI) | other shapes kept, min (% of base) "
             "| min colour | train s (UNet evals / step) | attack UNet evals / case (UDA, CCE) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["attack"]
        kept = min(r["others_accuracy"][s] / base[s] for s in base)
        rate = lambda x: f"{x['asr']:.2f} [{x['asr_ci95'][0]:.2f}, {x['asr_ci95'][1]:.2f}]"  # noqa: E731
        lo, hi = r["circle_presence_ci95"]
        train = f"{r['train_seconds']:.0f} ({r['unet_evals_per_step']:.1f})" if r["train_seconds"] is not None else "-"
        lines.append(f"| {r['row']} | {r['circle_presence']:.2f} [{lo:.2f}, {hi:.2f}] | {rate(a['unlearndiffatk'])} | {rate(a['cce'])} | "
                     f"{100 * kept:.0f}% | {r['min_colour_fidelity']:.2f} | {train} | "
                     f"{a['unlearndiffatk']['unet_evals_per_prompt']:.0f}, {a['cce']['unet_evals_per_prompt']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
