"""Cost of one SDD step: erase's engine vs the straightforward two-UNet fp32 design (the reference's), and what
`erase run`'s Stable Diffusion default costs per step before and after issue 36.

    python benchmarks/sdd_cost.py [--steps 3] [--sample-steps 10] [--json benchmarks/sdd_cost.json]
    python benchmarks/sdd_cost.py --default [--default-steps 400]    # the SD default's UNet calls and evaluations per step
    python benchmarks/sdd_cost.py --shapes sdd-teacher sdd sdd,adversarial=none [--shapes-steps 200 --rounds 2]  # in turns
    python benchmarks/sdd_cost.py --shapes sdd-teacher sdd --shapes-steps 1000 --rounds 1 --together   # at the same time

--default: `erase run` with its Stable Diffusion defaults (K = 50, --preserve auto: two retain prompts per step) on a
tiny SD 1 file (the counts depend on the schedule, not on the UNet's size), once with the options of the default before
issue 36 (the EMA teacher's trajectories on the concepts joined, --reuse 1, the retain term sampled by the teacher) and
once with today's, each for --default-steps steps; the record gets both rows (single-sample UNet evaluations and UNet
calls per step, counted by the engine) and what `erase run` predicts at start-up.

For a tiny UNet and for a randomly initialised UNet with the exact SD 1.5 config, at 32x32
latents on the CPU, each design runs in a fresh subprocess (so peak memory is its own):
  ours       one UNet; the teacher is the EMA of the trainable subset, passed by name; prompt
             embeddings computed once, then the text encoder freed; no VAE
  reference  student UNet + a full teacher UNet copy + text encoder + VAE resident, fp32;
             prompts re-encoded every step (as the authors' training script does)
Both draw the same trajectory indices k (same seed), so UNet evals/step match by construction;
time/step and peak memory (process max RSS above the baseline after imports) differ. Writes the record (every
measured value and the settings) to --json, then prints a title line and `table(record)`: a Markdown table with
ratios reference / ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = ["nudity", "violence"]


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(size: str):
    """(unet, text_encoder, tokenizer, vae, scheduler, latent_shape), random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erase.checkpoint.model_config import CONFIG_ROOT
    from erase.models import load_tokenizer
    from erase.tiny import tiny_configs

    torch.manual_seed(0)
    if size == "sd15":
        load = lambda c: {k: v for k, v in json.loads((CONFIG_ROOT / "sd1" / c / "config.json").read_text()).items()  # noqa: E731
                          if not k.startswith("_") and k != "architectures"}
        unet_cfg, vae_cfg, te_cfg = load("unet"), load("vae"), load("text_encoder")
    else:
        cfgs = tiny_configs("sd1")
        unet_cfg, vae_cfg, te_cfg = cfgs["unet"], cfgs["vae"], cfgs["text_encoder"]
    unet = UNet2DConditionModel.from_config(unet_cfg)
    text = CLIPTextModel(CLIPTextConfig(**te_cfg))
    vae = AutoencoderKL.from_config(vae_cfg)
    sched = DDIMScheduler.from_config(json.loads((CONFIG_ROOT / "sd1" / "scheduler" / "scheduler_config.json").read_text()))
    return unet, text, load_tokenizer("sd1"), vae, sched, (1, 4, 32, 32)


def encode(text, tok, prompts):
    import torch

    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text(ids).last_hidden_state


def run_ours(size: str, steps: int, sample_steps: int) -> dict:
    import torch

    from erase.engine.params import select_trainable
    from erase.engine.sampling import EvalCounter
    from erase.engine.trainer import TrainConfig, Trainer
    from erase.methods.sdd import SDD, SDDConfig
    from erase.models import Conditioning

    base = rss()
    unet, text, tok, vae, sched, shape = build(size)
    del vae  # never needed for training
    gen = torch.Generator().manual_seed(42)
    counter = EvalCounter()
    params = select_trainable(unet, "xattn")
    sdd = SDD(SDDConfig(sample_steps=sample_steps), CONCEPTS, unet=unet, scheduler=sched, latent_shape=shape, resolution=256,
              generator=gen, device=torch.device("cpu"), counter=counter)
    sdd.embeddings = {p: Conditioning(encode(text, tok, [p])) for p in sdd.prompts()}
    del text  # encoded once, then freed
    trainer = Trainer(TrainConfig(steps=steps), sdd, params, generator=gen, device=torch.device("cpu"), autocast_dtype=None,
                      run_config={}, state_dir=None)
    t = time.perf_counter()
    trainer.train()
    return {"seconds_per_step": (time.perf_counter() - t) / steps, "evals_per_step": counter.total / steps,
            "peak_rss_above_baseline": rss() - base}


def run_reference(size: str, steps: int, sample_steps: int) -> dict:
    """The straightforward design: two full UNets, text encoder and VAE resident, fp32."""
    import torch
    import torch.nn.functional as F

    base = rss()
    unet, text, tok, vae, sched, shape = build(size)
    teacher = copy.deepcopy(unet).requires_grad_(False)
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if ".attn2." in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    teacher_params = [p for n, p in teacher.named_parameters() if ".attn2." in n]
    gen = torch.Generator().manual_seed(42)
    sched.set_timesteps(sample_steps)
    evals, t0 = 0, time.perf_counter()
    for step in range(steps):
        # same draws as the engine: k from randperm, then z_T
        k = torch.randperm(sample_steps, generator=gen)[:1].item()
        z = torch.randn(shape, generator=gen)
        uncond, cond = encode(text, tok, [""]), encode(text, tok, [", ".join(CONCEPTS)])
        c_s = encode(text, tok, [CONCEPTS[step % len(CONCEPTS)]])
        with torch.no_grad():
            for t in sched.timesteps[:k]:
                out = teacher(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                evals += 2
                e_u, e_c = out.chunk(2)
                z = sched.step(e_u + 3.0 * (e_c - e_u), t, z).prev_sample
            t_k = sched.timesteps[k]
            target = unet(z, t_k, encoder_hidden_states=uncond).sample
        pred = unet(z, t_k, encoder_hidden_states=c_s).sample
        evals += 4  # uncond + cond forward, backward (2)
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for tp, p in zip(teacher_params, params):
                tp.lerp_(p, 0.001)
    return {"seconds_per_step": (time.perf_counter() - t0) / steps, "evals_per_step": evals / steps,
            "peak_rss_above_baseline": rss() - base}


def title(record: dict) -> str:
    """The line above the table: the settings it was measured under."""
    r = record
    return (f"SDD step cost, CPU ({r['threads']} threads), 32x32 latents, K = {r['sample_steps']} DDIM teacher steps, "
            f"{r['steps']} steps each, torch {r['torch']}")


def table(record: dict) -> str:
    """The Markdown table the docs show (header + rows, no title), from a record."""
    lines = ["| UNet | design | s/step | UNet evals/step | peak RSS above baseline |", "|---|---|---|---|---|"]
    for row in record["rows"]:
        size = row["unet"]
        for design in ("ours", "reference"):
            r = row[design]
            lines.append(f"| {size} | {design} | {r['seconds_per_step']:.2f} | {r['evals_per_step']:.1f} | "
                         f"{r['peak_rss_above_baseline'] / 2**20:.0f} MiB |")
        o, ref = row["ours"], row["reference"]
        lines.append(f"| {size} | **reference / ours** | {ref['seconds_per_step'] / o['seconds_per_step']:.2f}x | "
                     f"{ref['evals_per_step'] / o['evals_per_step']:.2f}x | "
                     f"{ref['peak_rss_above_baseline'] / max(1, o['peak_rss_above_baseline']):.2f}x |")
    return "\n".join(lines)


# the options that made the SD default before issue 36 (the rest as erase run's defaults): SDD's, and the run's
BEFORE = {"trajectories": "teacher", "sample_on": "joined", "reuse": 1}
BEFORE_RUN = {"train_set": "xattn", "preserve_per_step": 2, "preserve_paired": False, "adversarial": None}


def run_default(method_config: dict, steps: int, **run) -> dict:
    """erase run's defaults (with `method_config` over them) on a tiny SD 1 file at K = 50: counts per step."""
    import tempfile

    import torch
    from rich.console import Console

    from erase.engine.trainer import TrainConfig
    from erase.run import RunOptions, concept_eps_cost, erase_concepts, expected_evals_per_step
    from erase.tiny import write_tiny_checkpoint

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="erase-cost-"))
    model = write_tiny_checkpoint(work / "sd1.safetensors", "sd1")
    report = erase_concepts(RunOptions(model=model, concepts=CONCEPTS, out=work / "o.safetensors", train=TrainConfig(steps=steps),
                                       method_config=method_config, resolution=16, device="cpu", **run), Console(quiet=True), progress=False)
    cfg = report["config"]
    m = cfg["method_config"]
    predicted = expected_evals_per_step(m["sample_steps"], m["reuse"], retain_slots=cfg["preserve_per_step"],
                                        retain_frozen=m["trajectories"] == "frozen", paired=cfg["preserve_paired"],
                                        adversarial_steps=None if cfg["adversarial"] is None else cfg["adversarial"]["steps"],
                                        concept_eps=concept_eps_cost(m))
    return {"options": {k: m[k] for k in ("trajectories", "sample_on", "reuse", "target", "expand")} | {"train_set": cfg["train_set"],
                "preserve_per_step": cfg["preserve_per_step"], "preserve_paired": cfg["preserve_paired"], "adversarial": cfg["adversarial"]},
            "steps": steps, "unet_evals_per_step": report["unet_evals_per_step"], "unet_calls_per_step": report["unet_calls_per_step"],
            "predicted_evals_per_step": predicted}


def run_shapes(config: str, steps: int) -> dict:
    """One config row of benchmarks/shapes.py (its file in examples/shapes/configs/), with options changed as in
    "sdd,adversarial=none" (sweep.py's --set values), trained for `steps` steps on the shapes model: seconds and UNet
    evaluations per step from its run report."""
    import tempfile

    import torch
    from shapes import CONFIG_ROWS, erase_row
    from sweep import parse_value

    torch.set_num_threads(1)
    name, *changes = config.split(",")
    options = {**CONFIG_ROWS[name], **{k: parse_value(v) for k, v in (c.split("=", 1) for c in changes)}, "steps": steps}
    work = Path(tempfile.mkdtemp(prefix="erase-cost-"))
    _, report = erase_row(ROOT / "examples" / "shapes" / "shapes-sd.safetensors", ["circle"], work, **options)
    return {"seconds_per_step": report["seconds_per_step"], "unet_evals_per_step": report["unet_evals_per_step"],
            "unet_calls_per_step": report["unet_calls_per_step"]}


def shapes_side_by_side(configs: tuple[str, ...], steps: int, rounds: int, together: bool = False) -> dict:
    """The configs' cost on the shapes model, `rounds` runs of `steps` steps each, the mean of the rounds: in turns in
    one process (A B, B A, ...: a slower spell of a shared machine falls on both), or `together`, each config in its own
    process at the same time (one thread each: the same machine load for every config, for runs too long to repeat)."""
    runs = {c: [] for c in configs}
    for i in range(rounds):
        if together:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(len(configs), mp_context=multiprocessing.get_context("spawn")) as pool:  # fresh processes
                for c, r in zip(configs, pool.map(run_shapes, configs, [steps] * len(configs))):
                    runs[c].append(r)
        else:
            for c in (configs if i % 2 == 0 else configs[::-1]):
                runs[c].append(run_shapes(c, steps))
        print(f"round {i + 1}: {({c: rs[-1] for c, rs in runs.items()})}", file=sys.stderr, flush=True)
    return {"steps": steps, "rounds": rounds, "threads": 1, "together": together,
            "rows": {c: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} | {"runs": rs} for c, rs in runs.items()}}


def shapes_table(record: dict) -> str:
    """The shapes-model side-by-side runs (one per run length), each config against the first of its run."""
    lines = ["| run (shapes model, 1 thread per config) | config | s / step | UNet evals / step | UNet calls / step "
             "| s / step vs the first |", "|---|---|---|---|---|---|"]
    for r in record["shapes_default"].values():
        lines += _shapes_rows(r)
    return "\n".join(lines)


def _shapes_rows(r: dict) -> list[str]:
    first, lines = next(iter(r["rows"].values())), []
    for name, row in r["rows"].items():
        config, *changes = name.split(",")
        label = f"`{config}.toml`" + (f", {', '.join(changes)}" if changes else "")
        how = "at once" if r.get("together") else "in turns"
        lines.append(f"| {r['rounds']} x {r['steps']} steps, {how} | {label} | {row['seconds_per_step']:.3f} | {row['unet_evals_per_step']:.1f} | "
                     f"{row['unet_calls_per_step']:.1f} | {row['seconds_per_step'] / first['seconds_per_step']:.2f}x |")
    return lines


def default_table(record: dict) -> str:
    lines = ["| SD default | options | UNet evals / step (predicted) | UNet calls / step |", "|---|---|---|---|"]
    for name in ("before", "after"):
        r = record["default"][name]
        o = r["options"]
        opts = (f"trajectories {o['trajectories']} on {o['sample_on']}, reuse {o['reuse']}, --train {o.get('train_set', 'xattn')}, "
                f"{o['preserve_per_step']} retain prompts"
                + (", paired" if o["preserve_paired"] else "") + (f", adversarial {o['adversarial']['steps']} inner steps" if o["adversarial"] else ""))
        lines.append(f"| {name} | {opts} | {r['unet_evals_per_step']:.1f} ({r['predicted_evals_per_step']:.1f}) | {r['unet_calls_per_step']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--default", action="store_true", help="measure erase run's SD default before and after issue 36 (counts only)")
    ap.add_argument("--default-steps", type=int, default=400)
    ap.add_argument("--shapes", nargs="+", metavar="CONFIG", help="time these config rows side by side on the shapes model (e.g. sdd-teacher "
                    "sdd sdd,adversarial=none: the defaults before and after issue 36, and today's without its inner attack)")
    ap.add_argument("--shapes-steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--together", action="store_true", help="--shapes: run the configs at the same time, one process each")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "sdd_cost.json")
    ap.add_argument("--child", nargs=2, metavar=("DESIGN", "SIZE"))
    args = ap.parse_args()
    import torch

    if args.default:
        record = json.loads(args.json.read_text()) if args.json.exists() else {}
        record["default"] = {"concepts": CONCEPTS, "before": run_default(BEFORE, args.default_steps, **BEFORE_RUN),
                             "after": run_default({}, args.default_steps)}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(default_table(record))
        return
    if args.shapes:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        # one record per run length: a short run pays the retain prompts' first trajectories over fewer steps
        key = f"{args.rounds}x{args.shapes_steps}" + ("-together" if args.together else "")
        measured = shapes_side_by_side(tuple(args.shapes), args.shapes_steps, args.rounds, args.together)
        record = json.loads(args.json.read_text()) if args.json.exists() else {}  # read now: another run may have written
        record.setdefault("shapes_default", {})[key] = measured
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(shapes_table(record))
        return
    if args.child:
        torch.set_num_threads(os.cpu_count() or 1)
        fn = run_ours if args.child[0] == "ours" else run_reference
        print(json.dumps(fn(args.child[1], args.steps, args.sample_steps)))
        return
    rows = []
    for size in ("tiny", "sd15"):
        row = {"unet": size}
        for design in ("ours", "reference"):
            out = subprocess.run([sys.executable, __file__, "--child", design, size, "--steps", str(args.steps),
                                  "--sample-steps", str(args.sample_steps)], check=True, capture_output=True, text=True)
            row[design] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"done: {size}", file=sys.stderr, flush=True)
    record = {**(json.loads(args.json.read_text()) if args.json.exists() else {}), "steps": args.steps, "sample_steps": args.sample_steps,
              "threads": os.cpu_count(), "latent_shape": [1, 4, 32, 32], "concepts": CONCEPTS, "torch": torch.__version__, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(title(record) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
