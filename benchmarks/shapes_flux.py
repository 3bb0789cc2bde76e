"""The shapes-world FLUX.1-architecture model: its calibration and the methods table, on the UNet table's protocol.

    python benchmarks/shapes_flux.py [--seeds 8] [--only uce] [--work DIR] [--attack] [--model distilled]

The model is examples/shapes/shapes-flux.safetensors (Black Forest Labs' layout, transformer only) with its diffusers
folder examples/shapes/shapes-flux/ as `--text-encoders` (built from the shapes SD file by `examples/shapes/train_flux.py
--folder-only` when missing). Each erased row is `erase run MODEL --text-encoders FOLDER --config
examples/shapes/configs/flux/NAME.toml`, run through the CLI itself, then measured like benchmarks/shapes.py's rows
(erase.evaluate.shapes_world.measure: 8 seeds x 6 colours per shape, 20 Euler steps, CFG 5) and judged against the same
targets (the base's unconditional circle rate + 0.05; every other shape at 90 % of its base accuracy; colour 0.95).
Writes benchmarks/shapes_flux.json; `python benchmarks/tables.py` puts its tables in the README.

`--model distilled` measures the same rows on examples/shapes/shapes-flux-dev.safetensors, the model's FLUX.1-dev-like
student (a guidance embedder, one forward per step: `examples/shapes/train_flux.py --distill`), drawn at the same scale 5
as its input, and first what "unconditional" means there (`agreement`): the student's velocity for "" and for a caption
at each scale against the teacher's unconditional and guided velocities. Writes benchmarks/shapes_flux_dev.json.
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
# --model: the file measured and its record; "distilled" is MODEL's guidance-distilled student
MODELS = {"cfg": (MODEL, ROOT / "benchmarks" / "shapes_flux.json"),
          "distilled": (SHAPES / "shapes-flux-dev.safetensors", ROOT / "benchmarks" / "shapes_flux_dev.json")}
SCALES = (1.0, 3.5, 5.0, 7.0)  # the agreement's guidance scales (FluxPipeline's dev default 3.5, the tables' 5)
SIGMAS = (0.25, 0.5, 0.75)

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


def erase(model: Path, config: str, work: Path) -> tuple[Path, dict]:
    """`erase run` on `model` with the row's config, in a subprocess as a user runs it; the output and its run report."""
    from erase.checkpoint.write import report_path

    out = work / f"{model.stem}-{config}.safetensors"
    if not (out.exists() and report_path(out).exists()):
        subprocess.run([sys.executable, "-m", "erase", "run", str(model), "--text-encoders", str(FOLDER), "--config",
                        str(CONFIGS / f"{config}.toml"), "-o", str(out), "--force"], check=True)
    return out, json.loads(report_path(out).read_text())


def agreement(student_path: Path, images: int = 96, seed: int = 4242) -> dict:
    """What "unconditional" means on the distilled student: on fresh renders' latents noised at each of SIGMAS, the
    relative squared error ||a - b||^2 / ||b||^2 (mean over renders and sigmas) of the student's velocity at each scale g
    of SCALES, for "" against the teacher's unconditional velocity v_u (what SDD's target is on the teacher), and for the
    render's caption against the teacher's guided v_u + g (v_c - v_u) (what it was distilled to). `gap`: the same error
    of the teacher's own v_c against v_u, the size of the difference a caption makes."""
    import torch

    from erase.engine.sampling import predict
    from erase.feedback.invert import encode_pixels
    from erase.shapes import sample_world
    from erase.transformer_model import open_any_model

    teacher_model = open_any_model(MODEL, text_encoders=FOLDER)
    teacher, student = teacher_model.load_unet(), open_any_model(student_path, text_encoders=FOLDER).load_unet()
    text, vae = teacher_model.load_text_encoder(), teacher_model.load_vae()
    arr, samples = sample_world(images, seed, empty_fraction=0.0)
    with torch.no_grad():
        x0 = torch.cat([encode_pixels(vae, arr[i : i + 32], "cpu") for i in range(0, images, 32)])
    cond, empty = text.encode([s.caption for s in samples]), text.encode([""] * images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))

    def rel(a, b):
        return float(((a - b) ** 2).flatten(1).sum(1).div((b ** 2).flatten(1).sum(1)).mean())

    err = {"uncond": {g: [] for g in SCALES}, "guided": {g: [] for g in SCALES}, "gap": []}
    for sigma in SIGMAS:
        z, t = (1 - sigma) * x0 + sigma * noise, torch.tensor(sigma * 1000)
        with torch.no_grad():
            v_u, v_c = predict(teacher, z, t, empty, 0), predict(teacher, z, t, cond, 0)
            err["gap"].append(rel(v_c, v_u))
            for g in SCALES:
                err["uncond"][g].append(rel(predict(student, z, t, empty, 0, guidance=g), v_u))
                err["guided"][g].append(rel(predict(student, z, t, cond, 0, guidance=g), v_u + g * (v_c - v_u)))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"images": images, "sigmas": list(SIGMAS), "gap": mean(err["gap"]),
            "by_scale": [{"guidance": g, "uncond": mean(err["uncond"][g]), "guided": mean(err["guided"][g])} for g in SCALES]}


def agreement_table(record: dict) -> str:
    a = record["unconditional"]
    lines = ['| guidance input | student("") vs the teacher\'s unconditional | student(caption) vs the teacher\'s guided velocity |',
             "|---|---|---|"]
    lines += [f"| {r['guidance']:g} | {r['uncond']:.3f} | {r['guided']:.3f} |" for r in a["by_scale"]]
    lines.append(f"| (the teacher's conditional vs its unconditional) | {a['gap']:.3f} | |")
    return "\n".join(lines)


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
    ap.add_argument("--model", choices=sorted(MODELS), default="cfg", help="cfg: the shapes-world FLUX.1 (classifier-free "
                    "guidance); distilled: its guidance-distilled student (FLUX.1-dev's sampling), and the agreement first")
    ap.add_argument("--json", type=Path, help="the record (default: the model's, benchmarks/shapes_flux[_dev].json)")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per (shape, colour) prompt")
    ap.add_argument("--only", action="append", default=[], help="run only the row of this config (or 'base'); others keep their "
                    "recorded results")
    ap.add_argument("--work", type=Path, help="train into this folder and reuse an output already there")
    ap.add_argument("--merge", type=Path, nargs="+", help="add the rows of these records (rows run apart, in parallel, with "
                    "their own --json) to --json, in the table's order; run nothing")
    ap.add_argument("--attack", action="store_true", help="also attack each erased row measured (benchmarks/attack.py's 12 cases: "
                    "UnlearnDiffAtk and CCE on 'a <colour> circle' x 2 seeds)")
    args = ap.parse_args()
    model, default_json = MODELS[args.model]
    args.json = args.json or default_json
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
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    recorded = {r["row"]: r for r in previous.get("rows", [])}
    extra = {"unconditional": previous["unconditional"]} if "unconditional" in previous else {}
    if args.model == "distilled" and (not args.only or "agreement" in args.only):
        extra = {"unconditional": agreement(model)}
        print(agreement_table(extra))
    if recorded and json.loads(args.json.read_text())["protocol"]["seeds"] != args.seeds:
        raise SystemExit(f"--seeds {args.seeds}: {args.json} was measured with another protocol; its rows must match")
    rows = []
    for name, config in ROWS:
        if args.only and (config or "base") not in args.only:
            if name in recorded:
                rows.append(recorded[name])
            continue
        path, report = (model, None) if config is None else erase(model, config, work)
        t = time.perf_counter()
        m = measure(path, ["circle"], protocol, text_encoders=FOLDER)
        m.pop("samples")
        row = {"row": name, "config": config, "targets": ["circle"], "metrics": m, "measure_seconds": time.perf_counter() - t,
               "unet_evals_per_step": report["unet_evals_per_step"] if report else None,
               "train_seconds": train_seconds(report), "report": report}
        if args.attack and config is not None:
            from attack import attack

            row["attack"] = attack(path, model, work, text_encoders=FOLDER)
        rows.append(row)
        print(f"done: {name}", flush=True)
        done = {r["row"] for r in rows}  # after every row, with the recorded rows still to come: a stopped run keeps both
        later = [recorded[n] for n, _ in ROWS if n in recorded and n not in done]
        args.json.write_text(json.dumps({"protocol": vars(protocol), "model": model.name, "rows": rows + later} | extra, indent=2))
    record = {"protocol": vars(protocol), "model": model.name, "rows": rows} | extra
    args.json.write_text(json.dumps(record, indent=2))
    if record["rows"]:
        print(calibration_table(record))
        print()
        print(table(record))


if __name__ == "__main__":
    main()
