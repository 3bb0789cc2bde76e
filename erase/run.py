"""`erase run`: open a checkpoint, erase concepts with a method, write the result and a report.

Stages: validate -> open model -> encode prompts once (then free the text encoder) ->
load the UNet alone (never the VAE) -> pick trainable parameters -> train -> write the EMA
weights through the surgical writer -> delta file -> report.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from erase import __version__, backbones
from erase.backbones.flux import DEV_GUIDANCE
from erase.checkpoint.extras import ema_drop
from erase.checkpoint.write import check_output_path, provenance, report_path, sha256_file, write_checkpoint
from erase.engine.adversarial import Adversarial, AdversarialConfig, SoftPrefixAttack
from erase.engine.device import configure_attention, enable_fast_math, peak_memory, reset_peak_memory, resolve_device, resolve_precision
from erase.engine.distributed import World, check_identical, from_main, join, launcher_note, leave, same_on_every_rank, sample_streams
from erase.engine.memory import Plan, check_fits, count_parameters, free_memory, text_parameters
from erase.engine.memory import estimate as estimate_memory
from erase.engine.params import TRAIN_SETS, autocast_castable, frozen_copy, in_compute_dtype, select_trainable, selects
from erase.engine.preserve import SAMPLING, PreserveSpec, Retain, WithRetain, parse_preserve, preserved_groups, preserved_prompts, resolve
from erase.engine.sampling import EvalCounter
from erase.engine.trainer import TrainConfig, Trainer, load_state
from erase.errors import UsageError
from erase.methods import METHODS
from erase.methods.base import ClosedFormMethod
from erase.methods.options import method_options
from erase.models import MAX_TOKENS, Model, truncated_prompts, truncation_notes
from erase.transformer_model import open_any_model
from erase.vocabulary import Vocabulary, default_vocabulary, load_vocabulary

DEFAULT_PRESERVE = "auto"  # what `erase run` holds without --preserve: "" and the 5 concepts nearest each target
AUTO = "auto"  # RunOptions.adversarial: the method decides (run_defaults)


@dataclass
class RunOptions:
    model: Path
    concepts: list[str]
    out: Path | None = None
    method: str = "sdd"
    train: TrainConfig = field(default_factory=TrainConfig)
    method_config: dict = field(default_factory=dict)  # the method's own hyper-parameters (SDDConfig fields)
    resolution: int | None = None  # None: the family default (512 SD1, 768 SD2-v, 1024 SDXL)
    train_set: str | None = None  # None: the method's default (run_defaults; xattn but for SDD with preservation)
    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    xformers: bool = False
    delta: Path | None = None
    resume: Path | None = None
    force: bool = False
    prediction_type: str | None = None
    preserve: str | None = DEFAULT_PRESERVE  # --preserve: "a, b", "auto[:N]", "none"
    preserve_file: Path | None = None
    vocabulary: str | None = None  # builtin:NAME or a TOML file; None: chosen from the checkpoint
    preserve_weight: float = 1.0  # trained methods: gamma of the retain term (closed-form methods: in method_config)
    # trained methods: preserved prompts in each step's retain term; None: the method's default (run_defaults: SDD 3 under
    # preservation, where each costs a share of one input-model trajectory; 2 otherwise, as measured on the teacher's latents)
    preserve_per_step: int | None = None
    # trained methods: which preserved concept each retain slot draws: uniform over the prompts (as measured so far), or
    # loss (in proportion to each concept's running retain loss: the neighbour the edit moves most is held most often)
    preserve_sampling: str = "uniform"
    # trained methods: also hold, at each step's erasure latents, the erased prompt with a preserved concept in its place
    preserve_paired: bool | None = None  # None: the method's default
    batch_size: int = 1  # trained methods: sample streams per optimizer step on each process (reference 1)
    scale_lr: bool = False  # multiply --lr by the effective batch (batch size x processes), as diffusers' --scale_lr
    embeddings: list[Path] = field(default_factory=list)  # textual-inversion files whose tokens the concepts may use (HFI)
    job_digest: str | None = None  # set by `erase run --jobs`: recorded, so a re-run of the file skips this output
    # trained methods: the inner attack each step (None: off; AUTO: the method's default under --preserve)
    adversarial: AdversarialConfig | None | str = AUTO
    text_encoders: Path | None = None  # SD3 / FLUX.1: a diffusers folder whose text encoders replace the file's (erase.transformer_model)


def parse_concepts(text: str) -> list[str]:
    """'nudity, violence' -> ['nudity', 'violence']; empty entries are a usage error."""
    concepts = [c.strip() for c in text.split(",")]
    if not text.strip() or any(not c for c in concepts):
        raise UsageError(f"--concepts must be a comma-separated list of non-empty concepts, got {text!r}")
    return list(dict.fromkeys(concepts))


def default_output(model_path: Path) -> Path:
    if model_path.is_dir():
        return model_path.with_name(model_path.name + "-erased")
    return model_path.with_name(model_path.stem + "-erased.safetensors")


def _validate(opts: RunOptions) -> None:
    t = opts.train
    if t.steps < 1:
        raise UsageError("--steps must be >= 1")
    if t.lr <= 0:
        raise UsageError("--lr must be > 0")
    if not 0 <= t.ema_decay < 1:
        raise UsageError("--ema-decay must be in [0, 1)")
    if t.save_every < 0:
        raise UsageError("--save-every must be >= 0")
    if opts.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if opts.resolution is not None and (opts.resolution < 8 or opts.resolution % 8):
        raise UsageError("--resolution must be a positive multiple of 8")
    if opts.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not '{opts.method}'")
    if opts.train_set is not None and opts.train_set not in TRAIN_SETS:
        raise UsageError(f"--train must be one of {', '.join(TRAIN_SETS)}")
    if not opts.concepts:
        raise UsageError("--concepts is required")


def versions() -> dict:
    import diffusers
    import transformers

    return {"erase": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def preserving_defaults(cfg_cls, spec: PreserveSpec, method_cls=None, given: dict | None = None) -> dict:
    """Method options whose default follows --preserve. Preserving (the default, --preserve auto): concepts expanded
    into the vocabulary's prompts and SDD's target from the input model, and what the method adds
    (`method_cls.preserving_config`: SDD's latents from the input model on each step's own prompt), which measured best
    on the shapes model (benchmarks/README.md); --preserve none: each method exactly as its authors wrote it (bare
    concepts, SDD's self target). Options given on the command line always win."""
    fields = cfg_cls.__dataclass_fields__
    out = {}
    if "expand" in fields:
        out["expand"] = not spec.none
    if "target" in fields:
        out["target"] = "self" if spec.none else "frozen"
    if method_cls is not None and not spec.none and hasattr(method_cls, "preserving_config"):
        out.update(method_cls.preserving_config(given or {}))
    return out


def resolve_run_defaults(opts: RunOptions, method_cls, spec: PreserveSpec) -> RunOptions:
    """The run options left to the method (None, or AUTO for --adversarial) filled in with its defaults under --preserve
    (erase.methods.base.TrainedMethod.run_defaults); options given always win."""
    defaults = method_cls.run_defaults(preserving=not spec.none) if hasattr(method_cls, "run_defaults") else {}
    if opts.preserve_per_step is None:
        opts.preserve_per_step = defaults.get("preserve_per_step", 2)
    if opts.preserve_paired is None:
        opts.preserve_paired = defaults.get("preserve_paired", False)
    if isinstance(opts.adversarial, str):
        opts.adversarial = defaults.get("adversarial")
    if opts.train_set is None:
        opts.train_set = defaults.get("train_set", "xattn")
    return opts


def erase_concepts(opts: RunOptions, console: Console, *, progress: bool = True) -> dict:
    """Run one erasure end to end; return the report (also written beside the output). Under torchrun / accelerate
    launch every rank calls this; the trained methods train data parallel and rank 0 alone writes."""
    _validate(opts)
    world = join(resolve_device(opts.device).type)
    if not world.main:
        console = Console(quiet=True)
    if (note := launcher_note()) is not None:
        console.print(f"[yellow]warning:[/] {note}", highlight=False)
    state = load_state(opts.resume, world.rank) if opts.resume else None
    if state is not None:  # a resumed run continues the saved configuration; only --steps may grow
        saved = state["run_config"]
        if saved["concepts"] != opts.concepts or saved["method"] != opts.method:
            raise UsageError(f"--resume {opts.resume}: that state erased {saved['concepts']} with {saved['method']}; "
                             "pass the same --concepts and --method")
        steps = opts.train.steps
        opts.train = TrainConfig(**{**state["train_config"], "steps": steps, "betas": tuple(state["train_config"]["betas"])})
        opts.method_config = saved["method_config"]
        opts.train_set, opts.resolution = saved["train_set"], saved["resolution"]
        opts.preserve, opts.vocabulary = saved["preserve_option"], saved["vocabulary"]
        opts.preserve_file = Path(saved["preserve_file"]) if saved.get("preserve_file") else None
        opts.preserve_weight, opts.preserve_per_step = saved.get("preserve_weight", 1.0), saved.get("preserve_per_step", 1)
        opts.preserve_sampling = saved.get("preserve_sampling", "uniform")
        opts.preserve_paired = saved.get("preserve_paired", False)
        opts.embeddings = [Path(e["path"]) for e in saved.get("embeddings", [])]
        opts.batch_size = saved.get("batch_per_rank", 1)
        opts.precision = saved.get("precision_option", opts.precision)  # a bf16 run resumes in bf16
        opts.adversarial = AdversarialConfig(**saved["adversarial"]) if saved.get("adversarial") else None
        if saved.get("world_size", 1) != world.size:
            raise UsageError(f"--resume {opts.resume}: that run trained on {saved.get('world_size', 1)} process(es), this one has "
                             f"{world.size}; resume it under the same launch")

    model = open_any_model(opts.model, opts.prediction_type, opts.text_encoders, drawing=False, command="run")
    family_rules = backbones.rules(model.transformer)
    if opts.train_set in family_rules.REFUSED_TRAIN:
        raise UsageError(family_rules.REFUSED_TRAIN[opts.train_set].format(label=model.family.label))
    out = check_output_path(opts.model, opts.out or default_output(opts.model), force=opts.force)
    if opts.delta:
        check_output_path(opts.model, opts.delta, force=opts.force)
    if model.ckpt.format == "diffusers" and out.suffix == ".safetensors":
        raise UsageError("a diffusers folder is written as a folder: give --out a folder name")
    method_cls, method_cfg_cls = METHODS[opts.method]
    spec = parse_preserve(opts.preserve, opts.preserve_file)
    method_cfg = method_cfg_cls(**{**preserving_defaults(method_cfg_cls, spec, method_cls, opts.method_config), **opts.method_config})
    asked_train, asked_adversarial = opts.train_set, opts.adversarial
    resolve_run_defaults(opts, method_cls, spec)
    if asked_train is None:  # the family's own set where the method's default names another's (erase.backbones)
        opts.train_set = family_rules.DEFAULT_TRAIN.get(opts.train_set, opts.train_set)
    if asked_adversarial is AUTO and not family_rules.INNER_ATTACK_BY_DEFAULT:
        opts.adversarial = None
    method_cfg.validate()
    opts.vocabulary = opts.vocabulary or default_vocabulary(model.ckpt.metadata)
    vocab = load_vocabulary(opts.vocabulary)
    t_start = time.perf_counter()
    input_sha = sha256_file(opts.model)
    closed_form = issubclass(method_cls, ClosedFormMethod)
    if opts.adversarial is not None:
        opts.adversarial.validate()
        if closed_form or not method_cls.adversarial:
            raise UsageError(f"--adversarial does not apply to --method {opts.method}"
                             + (" (it solves in closed form: use --robust)" if closed_form else " (its loss is not one draw of a prompt)"))
    if closed_form and opts.batch_size != 1:
        raise UsageError(f"--batch-size does not apply to --method {opts.method} (it solves, it does not train)")
    if not closed_form and not method_cls.batched and (opts.batch_size != 1 or world.size != 1):
        raise UsageError(f"--method {opts.method} trains one sample per step on one process: no --batch-size or launcher yet")
    if closed_form and not world.main:  # a solve is seconds: rank 0 does it, the others have nothing to do
        leave(world)
        return {"rank": world.rank, "output": None}
    run = ClosedForm if closed_form else Training
    result = run(opts, model, method_cls, method_cfg, spec, vocab, console, out=out, state=state, progress=progress, world=world).erase()
    if not world.main:
        leave(world)
        return {"rank": world.rank, "output": None}

    # Write: the new weights under the file's own names, then the delta file and the report.
    replacements = model.file_replacements(result.weights)
    drop, dropped_meta = ema_drop(model.ckpt)
    fields = {"kind": "checkpoint", "method": opts.method, "concepts": opts.concepts, "config": result.config,
              "preserve": result.preserve["concepts"], "changed_tensors": len(replacements)}
    if opts.job_digest:
        fields["job_digest"] = opts.job_digest
    meta = {**provenance(model.ckpt, fields, input_sha256=input_sha), **dropped_meta}
    write_checkpoint(model.ckpt, out, replacements, metadata=meta, drop=drop)
    delta_path = write_delta(model, opts.delta, result.weights, meta) if opts.delta else None
    report = {
        "output": str(out),
        "input": str(opts.model),
        "input_sha256": input_sha,
        "output_sha256": sha256_file(out),
        "delta": str(delta_path) if delta_path else None,
        "family": model.family.name,
        "method": opts.method,
        "config": result.config,
        "preserve": result.preserve,  # what was held to the input model and how it was chosen
        "versions": versions(),
        "threads": torch.get_num_threads(),  # CPU threads (erase.engine.threads)
        **result.report,
        "wall_seconds": time.perf_counter() - t_start,
        "truncated_prompts": result.truncated,  # prompt -> token count, for prompts the text encoder cut at 77 tokens
    }
    report_file = report_path(out)
    report_file.write_text(json.dumps(report, indent=2))
    report["report"] = str(report_file)
    leave(world)
    return report


@dataclass
class Erasure:
    """What a method produced: new values of UNet parameters (diffusers names) and what to report."""

    weights: dict[str, torch.Tensor]
    config: dict
    preserve: dict
    report: dict
    truncated: dict[str, int]


class _Run:
    """The stages every method shares: choosing what to preserve and encoding prompts with the text encoder."""

    def __init__(self, opts: RunOptions, model: Model, method_cls, method_cfg, spec: PreserveSpec, vocab: Vocabulary,
                 console: Console, *, out: Path, state: dict | None, progress: bool, world: World = World()) -> None:
        self.opts, self.model, self.method_cls, self.method_cfg, self.out = opts, model, method_cls, method_cfg, out
        self.spec, self.vocab, self.console, self.state, self.progress = spec, vocab, console, state, progress
        self.world = world
        self.device = resolve_device(opts.device)  # where the text encoder (and the UNet, for trained methods) runs
        if world.size > 1 and self.device.type == "cuda":  # one GPU per rank (erase.engine.distributed.join set it current)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _warn_truncated(self, prompts: list[str]) -> dict[str, int]:
        long = truncated_prompts(self.model.family, prompts)
        for note in truncation_notes(long):
            self.console.print(f"[yellow]warning:[/] {note}", highlight=False)
        return long

    def _embedder(self, text):
        """prompts (, length) -> embeddings (B, length, D) on --device; SD's 77 tokens unless a method asks for fewer."""
        return lambda prompts, length=MAX_TOKENS: text.encode(prompts, device=self.device, length=length).embeds

    def _embedding_record(self) -> list[dict]:
        """Which learned tokens the concepts could use: the file and its hash, so the erasure can be traced to its labels."""
        from erase.embeddings import load_embedding

        return [{"path": str(p), "sha256": sha256_file(p), "token": load_embedding(p).token} for p in self.opts.embeddings]

    def _preserve(self, text) -> tuple[list[str], dict]:
        concepts, record = resolve(self.spec, self.opts.concepts, self._embedder(text), text.tokenizers[0], self.vocab)
        if record["auto_chosen"]:
            for target, near in record["auto_chosen"].items():
                self.console.print(f"  preserve auto   {target}: " + ", ".join(f"{c} ({s:.2f})" for c, s in near), highlight=False)
        return concepts, record


class ClosedForm(_Run):
    """A method that solves for the new weights (UCE): the text encoder and the edited tensors, never the UNet."""

    def _embedders(self, text):
        """(prompts -> token embeddings, prompts -> pooled vectors), one text-encoder pass per prompt for both: the pooled
        vector of every prompt the first encoded is kept (a vector each; on FLUX.1 a T5-XXL pass is the solve's main cost)."""
        pooled: dict[str, torch.Tensor] = {}

        def encode(prompts, length=MAX_TOKENS):
            cond = text.encode(prompts, device=self.device, length=length)
            if cond.pooled is not None:
                pooled.update({p: cond.pooled[i : i + 1] for i, p in enumerate(prompts)})
            return cond.embeds

        def encode_pooled(prompts):
            if missing := list(dict.fromkeys(p for p in prompts if p not in pooled)):
                encode(missing)
            return torch.cat([pooled[p] for p in prompts])

        return encode, encode_pooled

    def erase(self) -> Erasure:
        t0 = time.perf_counter()
        text = self.model.load_text_encoder(self.opts.embeddings)
        preserve, record = self._preserve(text)
        encode, encode_pooled = self._embedders(text)
        method = self.method_cls(self.method_cfg, self.opts.concepts, preserve=preserve, vocab=self.vocab,
                                 tokenizer=text.tokenizers[0], encode=encode, encode_pooled=encode_pooled)
        long = self._warn_truncated([p for pair in method.pairs() for p in pair[:2]] + method.preserved_prompts())
        names = method.edited(self.model.unet_param_names(), self.model.transformer)
        weights = self.model.read_parameters(names)
        self.console.print(f"[bold]Solving[/] ({self.opts.method.upper()}) on [cyan]{self.model.path.name}[/] ({self.model.family.label}): "
                           f"erase {', '.join(self.opts.concepts)}; preserve {len(preserve)} concepts; {len(names)} tensors", highlight=False)
        new, info = method.solve(weights)
        config = {"method": self.opts.method, "concepts": self.opts.concepts, "method_config": asdict(self.method_cfg),
                  "preserve_option": self.opts.preserve, "vocabulary": self.opts.vocabulary, "embeddings": self._embedding_record()}
        n = sum(w.numel() for w in new.values())
        report = {"solve": info, "edited": {"tensors": len(new), "parameters": n}, "seconds": time.perf_counter() - t0,
                  "device": str(self.device), "unet_evals_per_step": 0.0, "peak_memory": peak_memory(self.device)}
        return Erasure(new, config, record, report, long)


class Training(_Run):
    """A trained method (SDD): prompts encoded once, one UNet, the trainer loop; the EMA weights are the result."""

    def erase(self) -> Erasure:
        opts, model = self.opts, self.model
        world = self.world
        state_dir = opts.resume or self.out.with_name(self.out.stem + ".resume")
        device = self.device
        frozen_dtype, autocast_dtype, precision_label = resolve_precision(opts.precision, device)
        reset_peak_memory(device)
        resolution = opts.resolution or model.default_resolution
        factor = model.latent_factor
        if resolution % factor:
            raise UsageError(f"--resolution must be a multiple of {factor} for this model's VAE")
        memory = self._check_memory(frozen_dtype, resolution // factor)

        # Text: encode every prompt once on --device, then free the encoder before the UNet is loaded. Under a launcher
        # rank 0 alone chooses and encodes, and the others receive its result.
        if world.main:
            text = model.load_text_encoder(opts.embeddings)
            preserve, record = self._preserve(text)
            prompts = self.method_cls.prompts_for(self.method_cfg, opts.concepts, self.vocab)
            kept = preserved_prompts(preserve, self.vocab, expand_concepts=getattr(self.method_cfg, "expand", False))
            prompts = list(dict.fromkeys(prompts + kept))
            long = self._warn_truncated(prompts)
            encoded = text.encode(prompts, device=device).to("cpu")  # one batch for every prompt, fp32
            del text
            gc.collect()
        record, kept, prompts, long, encoded = from_main((record, kept, prompts, long, encoded) if world.main else None, world)
        # TF32 only now: the prompts are encoded and the preserved neighbours chosen in true fp32, so that a GPU run holds
        # the same concepts as a CPU run
        enable_fast_math(device, autocast_dtype)
        if kept and opts.preserve_per_step < 1:
            raise UsageError("--preserve-per-step must be >= 1")
        if opts.preserve_sampling not in SAMPLING:
            raise UsageError(f"--preserve-sampling must be one of {', '.join(SAMPLING)}")
        generator = torch.Generator().manual_seed(opts.train.seed)
        streams = sample_streams(generator, opts.train.seed, world, opts.batch_size)
        effective_batch = opts.batch_size * world.size
        if opts.scale_lr and self.state is None:  # linear rule (diffusers' --scale_lr); a resumed run keeps its saved lr
            opts.train = TrainConfig(**{**asdict(opts.train), "lr": opts.train.lr * effective_batch})
        counter = EvalCounter()
        latent_shape = (1, model.latent_channels, resolution // factor, resolution // factor)
        scheduler = model.training_scheduler(resolution)

        # UNet: one copy on the device; frozen weights in the compute dtype, trainables in fp32 from the file's own tensors.
        unet = model.load_unet(dtype=frozen_dtype, device=device, fp32=lambda name: selects(name, opts.train_set, model.transformer))
        attention = configure_attention(unet, opts.xformers, device)
        if opts.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        params = select_trainable(unet, opts.train_set)
        method = self.method_cls(self.method_cfg, opts.concepts, unet=unet, scheduler=scheduler, latent_shape=latent_shape,
                                 resolution=resolution, generator=generator, device=device, counter=counter, vocab=self.vocab,
                                 generators=streams)
        encoded = encoded.to(device, frozen_dtype)
        method.embeddings = {p: encoded[i : i + 1] for i, p in enumerate(prompts)}
        if getattr(self.method_cfg, "eta_spare", False):  # each erased concept's nearest preserved neighbour (--preserve auto)
            if not record["auto_chosen"]:
                raise UsageError("--eta-spare needs --preserve auto: it spares the nearest neighbour auto chooses")
            method.neighbours = {t: near[0][0] for t, near in record["auto_chosen"].items() if near}
        frozen = method.frozen  # the input's trainable subset, when the method keeps a copy
        if (opts.adversarial is not None or kept) and frozen is None:
            frozen = frozen_copy(method.trainable)  # one copy, shared by the inner attack and the retain term
        # Every forward that names the frozen copy runs under autocast, which casts its linear and convolution weights to
        # the compute dtype at each call: holding them in that dtype computes the same, at half the memory, cast once.
        castable = autocast_castable(unet)
        if frozen is not None:
            frozen = in_compute_dtype(frozen, castable, autocast_dtype)
            if method.frozen is not None:
                method.frozen = frozen
        loss = method  # what the trainer steps on: the method, with its prompt under attack, plus the retain term
        if opts.adversarial is not None:  # the inner attack needs the text encoder (every rank holds its own) and theta0
            attack = SoftPrefixAttack(opts.adversarial, model.load_text_encoder(opts.embeddings), opts.concepts[0], unet=unet,
                                      frozen=frozen, resolution=resolution, device=device, dtype=frozen_dtype, counter=counter, world=world)
            loss = Adversarial(method, attack)
        if kept:  # hold the preserved prompts to the input model (none: the reference algorithm, bit for bit)
            cfg = self.method_cfg
            groups = preserved_groups(record["concepts"], self.vocab, expand_concepts=getattr(cfg, "expand", False))
            concept_of = {p: c for c, prompts in groups.items() for p in prompts}
            retain = Retain(kept, weight=opts.preserve_weight, per_step=opts.preserve_per_step, unet=unet, scheduler=scheduler,
                            sampling=opts.preserve_sampling, concept_of=concept_of,
                            guidance=cfg.guidance, sample_steps=cfg.sample_steps, reuse=getattr(cfg, "reuse", 1), latent_shape=latent_shape,
                            resolution=resolution, generator=generator, device=device, counter=counter, frozen=frozen, generators=streams,
                            sampler=method.retain_sampler, paired=opts.preserve_paired,
                            similarity={t: dict(near) for t, near in record["auto_chosen"].items()})
            retain.embeddings = method.embeddings
            loss = WithRetain(loss, retain, erased=method.erased_prompts())

        run_config = {
            "method": opts.method, "concepts": opts.concepts, "method_config": asdict(self.method_cfg), "train_set": opts.train_set,
            "resolution": resolution, "prediction_type": model.family.prediction_type, "precision": precision_label,
            "precision_option": opts.precision,
            "device": str(device), "gradient_checkpointing": opts.gradient_checkpointing, "attention": attention,
            "preserve_option": opts.preserve, "preserve_file": str(opts.preserve_file) if opts.preserve_file else None,
            "vocabulary": opts.vocabulary, "preserve_weight": opts.preserve_weight, "preserve_per_step": opts.preserve_per_step,
            "preserve_sampling": opts.preserve_sampling, "preserve_paired": opts.preserve_paired,
            "preserved_prompts": len(kept), "embeddings": self._embedding_record(),
            "world_size": world.size, "batch_per_rank": opts.batch_size, "effective_batch": effective_batch,
            "lr_rule": "linear: --lr x effective batch" if opts.scale_lr else "none: --lr as given",
            "adversarial": asdict(opts.adversarial) if opts.adversarial else None,
        }
        trainer = Trainer(opts.train, loss, params, generator=generator, device=device, autocast_dtype=autocast_dtype,
                          run_config=run_config, state_dir=state_dir, streams=streams, world=world, castable=castable)
        if self.state is not None:
            trainer.load(self.state)
            if not same_on_every_rank(trainer.step, world):
                raise UsageError(f"--resume {state_dir}: the ranks stopped at different steps (Ctrl-C reached them at different "
                                 "moments); resume from a --save-every state instead")
        n_trainable = sum(p.numel() for p in params.values())
        n_unet = sum(p.numel() for p in unet.parameters())
        _print_summary(self.console, model, opts, run_config, n_trainable, n_unet, len(params), trainer.step)

        counter.reset()
        first_step = trainer.step
        t_train = time.perf_counter()
        _train_with_progress(trainer, self.console, self.progress)
        train_seconds = time.perf_counter() - t_train
        steps_done = max(1, trainer.step - first_step)
        check_identical(trainer.ema.shadow, world, "EMA weights")
        check_identical(dict(params), world, "trained weights")
        if state_dir.exists() and opts.resume is None and world.main:  # a finished run needs no resume state
            for f in state_dir.iterdir():
                f.unlink()
            state_dir.rmdir()
        report = {
            "trainable": {"set": opts.train_set, "tensors": len(params), "parameters": n_trainable,
                          "fraction_of_unet": n_trainable / n_unet},
            "steps": trainer.step,
            "steps_this_session": trainer.step - first_step,
            "resumed_from_step": first_step if self.state is not None else None,
            "unet_evals_per_step": counter.total / steps_done,  # on this process; all processes: x world_size
            "unet_evals_per_step_all_processes": counter.total * world.size / steps_done,
            "unet_calls_per_step": counter.calls / steps_done,  # forward calls, each of any batch (on this process)
            "world_size": world.size, "batch_per_rank": opts.batch_size, "effective_batch": effective_batch, "lr": opts.train.lr,
            "seconds_per_step": train_seconds / steps_done,
            "peak_memory": peak_memory(device),
            "memory_estimate": memory,  # bytes per component, from the parameter counts (erase.engine.memory)
            "loss_curve": trainer.curve,
            "final_loss": trainer.curve[-1][1] if trainer.curve else None,
        }
        return Erasure(trainer.ema.shadow, {**run_config, "train": asdict(opts.train)}, record, report, long)


    def _check_memory(self, frozen_dtype: torch.dtype, latent_side: int) -> dict:
        """The run's memory estimate, before anything loads; on a GPU, one line (naming what would fit) when the run cannot fit
        its free memory."""
        opts = self.opts
        unet_params, trainable = count_parameters(self.model, tuple(TRAIN_SETS))
        plan = Plan(unet_params=unet_params, trainable=trainable, train_set=opts.train_set, compute_bytes=torch.finfo(frozen_dtype).bits // 8,
                    ema=opts.train.ema_decay > 0, frozen_copy=not self.spec.none or opts.adversarial is not None
                    or self.method_cls.keeps_input_copy(self.method_cfg),
                    text_params=text_parameters(self.model) if opts.adversarial is not None else 0, family=self.model.family.name,
                    latent_pixels=latent_side ** 2, batch=opts.batch_size, gradient_checkpointing=opts.gradient_checkpointing)
        free = free_memory(self.device)
        if free is None:
            return estimate_memory(plan)
        need, warning = check_fits(plan, free, str(self.device))
        if warning:
            self.console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        return need


def write_delta(model: Model, path: Path, shadow: dict[str, torch.Tensor], meta: dict) -> Path:
    """Only the changed tensors, as fp32 differences (erased - base), self-describing for `erase merge`."""
    delta = {}
    for key, value in model.file_replacements({n: v.float().cpu() for n, v in shadow.items()}).items():
        delta[key] = (value.float() - model.ckpt.get(key).float()).contiguous()
    info = {k: v for k, v in meta.items() if v is not None}
    info.update({"erase.kind": "delta", "erase.family": model.family.name,
                 "erase.delta": "fp32 differences: erased minus input, under the input's tensor names"})
    from safetensors.torch import save_file

    tmp = path.with_name("." + path.name + ".tmp")
    save_file(delta, str(tmp), metadata=info)
    os.replace(tmp, path)
    return path


def _print_summary(console: Console, model: Model, opts: RunOptions, cfg: dict, n_trainable: int, n_unet: int,
                   n_tensors: int, start_step: int) -> None:
    m = cfg["method_config"]
    console.print(f"[bold]Running erasure[/] ({opts.method.upper()}) on [cyan]{model.path.name}[/] ({model.family.label}, {cfg['prediction_type']})")
    shown = [name for name, o in method_options(METHODS).items() if o.summary] + ["expand"]  # declared with summary=True
    details = ", ".join(f"{k} {m[k]}" for k in shown if k in m)
    console.print(f"  concepts        {', '.join(opts.concepts)}  ({details})")
    held = cfg["preserved_prompts"]
    console.print("  preserve        " + (f"{held} prompts held to the input model (retain weight {cfg['preserve_weight']:g}, "
                                            f"{cfg['preserve_per_step']} per step" + (", paired" if cfg["preserve_paired"] else "") + ")"
                                            if held else "nothing (--preserve none: the reference algorithm)"))
    console.print(f"  trainable       {opts.train_set}: {n_tensors} tensors, {n_trainable:,} parameters "
                  f"({100 * n_trainable / n_unet:.1f}% of the {'transformer' if model.transformer else 'UNet'})")
    console.print(f"  device          {cfg['device']}, {cfg['precision']}, attention {cfg['attention']}"
                  + (", gradient checkpointing" if cfg["gradient_checkpointing"] else ""))
    t = opts.train
    console.print(f"  steps           {t.steps} (from {start_step}), lr {t.lr:g}, EMA {t.ema_decay}, seed {t.seed}, "
                  f"resolution {cfg['resolution']}")
    if "reuse" in m:
        distilled = model.transformer and backbones.distilled(model.family.name, model.config)
        evals = expected_evals_per_step(m["sample_steps"], m["reuse"], retain_slots=cfg["preserve_per_step"] if held else 0,
                                        retain_frozen=m.get("trajectories") == "frozen", paired=bool(cfg["preserve_paired"] and held),
                                        adversarial_steps=None if cfg["adversarial"] is None else cfg["adversarial"]["steps"],
                                        concept_eps=concept_eps_cost(m), guided_cost=1 if distilled else 2)
        who = "the input model" if m.get("trajectories") == "frozen" or opts.method == "esd" else "the EMA teacher"
        sampler = "flow-matching Euler" if model.transformer else "DDIM"
        guidance = f"guidance input {DEV_GUIDANCE} (guidance-distilled: one forward a step)" if distilled else f"CFG {m['guidance']}"
        console.print(f"  trajectories    {who}, {m['sample_steps']} {sampler} steps, {guidance}, reuse {m['reuse']}; "
                      f"expected ~{evals * opts.batch_size:.1f} UNet evals/step" + (" per process" if cfg["world_size"] > 1 else ""))
    if cfg["adversarial"] is not None:
        a = cfg["adversarial"]
        how = "one step per step, from the attacked term's own forward" if a["steps"] == 0 else f"{a['steps']} inner steps per step"
        console.print(f"  adversarial     {a['tokens']} soft token(s) against the erasure, {how}, lr {a['lr']:g}")
    if cfg["effective_batch"] > 1:
        console.print(f"  batch           {opts.batch_size} per process x {cfg['world_size']} process(es) = {cfg['effective_batch']} "
                      f"samples per step; lr {t.lr:g} ({cfg['lr_rule']})")


def expected_evals_per_step(k: int, reuse: int, *, retain_slots: int = 0, retain_frozen: bool = False, paired: bool = False,
                            adversarial_steps: int | None = None, concept_eps: str | None = None, guided_cost: int = 2) -> float:
    """UNet evaluations per step on average (one sample), as erase.engine.sampling.EvalCounter counts them. A trajectory
    stops at the last of its `reuse` latents, drawn without repeats from the K steps: E[last] = reuse (K + 1) / (reuse + 1)
    - 1 guided steps (`guided_cost` evaluations each: 2, or 1 on a guidance-distilled model), shared by `reuse` steps;
    one more when the input model's trajectory also brings the last latent's target. Each loss term: its target's forward (free for the retain term on the input model's
    latents), the student's forward and backward (3). `concept_eps` (SDD's --eta): the erasure's target also needs the
    input model's eps(z, c), "free" from its trajectory (whose last latent then costs one more guided step) or one more
    "forward"; "+spare" (--eta-spare): and eps(z, n) of the neighbour, one more forward."""
    last = reuse * (k + 1) / (reuse + 1) - 1
    eps_cost, _, spare = (concept_eps or "").partition("+")
    g = guided_cost
    erase = g * last / reuse + 1 + 3 + {"": 0, "free": g / reuse, "forward": 1}[eps_cost] + (spare == "spare")
    retain = (g * (last + 1) / reuse + 3) if retain_frozen else (g * last / reuse + 1 + 3)
    attack = 0 if adversarial_steps is None else (6 if adversarial_steps == 0 else 1 + 3 * adversarial_steps + 3)
    return erase + retain_slots * retain + 4 * paired + attack


def concept_eps_cost(method_config: dict) -> str | None:
    """How SDD's negative-guided target gets eps(z, c) (erase.methods.sdd.SDD.free_concept_eps); None: not needed."""
    if not method_config.get("eta"):
        return None
    own_input = method_config.get("trajectories") == "frozen" and method_config.get("sample_on") == "own"
    return ("free" if own_input else "forward") + ("+spare" if method_config.get("eta_spare") else "")


def _train_with_progress(trainer: Trainer, console: Console, progress: bool) -> None:
    total = trainer.cfg.steps
    if progress and console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("[bold]erasing"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("ema {task.fields[ema]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("erase", total=total, completed=trainer.step, loss="-", ema="-", rate="")
            start = trainer.step

            def update(p):
                rate = (p.step - start) / max(p.elapsed, 1e-9)
                bar.update(task, completed=p.step, loss=f"{p.loss:.4g}", ema=f"{p.ema_loss:.4g}", rate=f"{rate:.2f} it/s")

            trainer.train(update)
        return
    every = max(1, total // 20)
    start = trainer.step

    def line(p):
        if p.step % every == 0 or p.step == total:
            rate = (p.step - start) / max(p.elapsed, 1e-9)
            eta = (total - p.step) / max(rate, 1e-9)
            console.print(f"step {p.step}/{total}  loss {p.loss:.4g}  ema {p.ema_loss:.4g}  {rate:.2f} it/s  eta {eta:.0f}s",
                          highlight=False)

    trainer.train(line if progress else None)

