"""Images for spot checks and evaluation: seeded, reproducible, with optional SLD safety guidance.

Our own denoising loop over diffusers' schedulers (rather than a diffusers pipeline) because
SLD needs a third guidance branch inside the loop, and because `run`, `generate` and
`evaluate` then share one code path for SD1, SD2 and SDXL.

SLD (Safe Latent Diffusion, Schramowski et al., CVPR 2023, arXiv 2211.05105), notation:
  e_u, e_p, e_S   unconditional, prompt and safety-concept predictions (one batched UNet call)
  s_S             `sld.scale`      guidance scale of the safety term
  lambda          `sld.threshold`  where the prompt already differs from the concept enough
  s_m, beta_m     `sld.momentum`, `sld.beta`
  delta_S = min(1, s_S |e_p - e_S|) where e_p - e_S < lambda, else 0        (eq. 6)
  g_S     = delta_S * (e_S - e_u) + s_m * nu;  nu <- beta_m nu + (1 - beta_m) g_S   (eqs. 4, 7, 8)
  e~      = e_u + s_g * ((e_p - e_u) - g_S)   once step >= warm-up, else plain CFG  (eq. 3)
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from erase.backbones import distilled, one_forward, set_sampling_timesteps
from erase.engine.device import check_xformers, configure_attention, resolve_device, resolve_precision
from erase.engine.sampling import predict
from erase.errors import EraseError, UsageError
from erase.models import Conditioning, Model

SCHEDULERS = {  # name -> (diffusers class, extra config, A1111 sampler name)
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
FLOW_SCHEDULERS = ("ddim", "euler")  # SD3: flow-matching Euler (ddim: generate's default, read as "the family's sampler")
SLD_CONCEPT = ("hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood, "
               "obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, cruelty")


@dataclass(frozen=True)
class SLDConfig:
    warmup: int  # steps of plain CFG before the safety term applies
    scale: float  # s_S
    threshold: float  # lambda
    momentum: float  # s_m
    beta: float  # beta_m


# The paper's hyper-parameter sets (warm-up, s_S, lambda, s_m, beta_m). diffusers' SafetyConfig.WEAK has s_S = 20; the
# paper's weak configuration has 200, which erase uses (a tenth of the guidance would make "weak" far weaker than published).
# The update itself is checked against diffusers' StableDiffusionPipelineSafe (tests/test_generate.py).
SLD_PRESETS = {
    "sld-weak": SLDConfig(15, 200.0, 0.0, 0.0, 0.0),
    "sld-medium": SLDConfig(10, 1000.0, 0.01, 0.3, 0.4),
    "sld-strong": SLDConfig(7, 2000.0, 0.025, 0.5, 0.7),
    "sld-max": SLDConfig(0, 5000.0, 1.0, 0.5, 0.7),
}


@dataclass(frozen=True)
class Job:
    """One image: everything that decides its pixels."""

    prompt: str
    seed: int
    guidance: float
    negative: str = ""


@dataclass
class GenSettings:
    steps: int = 25
    guidance: float | None = None  # None: the family default (`for_model`)
    size: int | None = None  # None: the family default
    scheduler: str = "ddim"
    negative: str = ""
    batch: int = 4
    device: str = "auto"
    precision: str = "auto"
    safety: str | None = None  # an SLD preset name
    safety_concept: str = SLD_CONCEPT
    sld: SLDConfig | None = field(default=None, repr=False)  # explicit SLD settings (tests); overrides `safety`
    embeddings: tuple[Path, ...] = ()  # textual-inversion files (erase.embeddings) whose tokens prompts may use
    xformers: bool = False  # xformers attention in the UNet (CUDA, when installed; erase.engine.device.configure_attention)

    def for_model(self, model) -> "GenSettings":
        """These settings with the guidance scale the model's family draws with where none was given (7.5 on Stable
        Diffusion, SD3 7.0, FLUX.1-dev 3.5, a FLUX.1 without a guidance embedder such as schnell 1)."""
        return self if self.guidance is not None else dataclasses.replace(self, guidance=model.default_guidance)

    def validate(self) -> None:
        if self.steps < 1:
            raise UsageError("--steps must be >= 1")
        if self.batch < 1:
            raise UsageError("--batch must be >= 1")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise UsageError(f"--size must be a positive multiple of 8, not {self.size}")
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
        if self.safety is not None and self.safety not in SLD_PRESETS:
            raise UsageError(f"--safety must be one of {', '.join(SLD_PRESETS)}")
        if (self.safety or self.sld) and not self.safety_concept.strip():
            raise UsageError("--safety-concept must not be empty")
        if self.xformers:  # refused before any image is drawn, not when the model loads
            check_xformers(resolve_device(self.device))

    @property
    def sld_config(self) -> SLDConfig | None:
        return self.sld or (SLD_PRESETS[self.safety] if self.safety else None)


def sld_guidance(e_u, e_p, e_s, scale_g: torch.Tensor, step: int, sld: SLDConfig | None, state: dict) -> torch.Tensor:
    """Combine predictions into the guided one (plain CFG when `sld` is None)."""
    guidance = e_p - e_u
    if sld is not None:
        diff = e_p - e_s
        delta = torch.where(diff >= sld.threshold, torch.zeros_like(diff), torch.clamp(diff.abs() * sld.scale, max=1.0))  # eq. 6
        g_s = delta * (e_s - e_u)  # eq. 4
        nu = state.get("momentum", torch.zeros_like(g_s))
        g_s = g_s + sld.momentum * nu  # eq. 7
        state["momentum"] = sld.beta * nu + (1 - sld.beta) * g_s  # eq. 8
        if step >= sld.warmup:
            guidance = guidance - g_s  # eq. 3
    return e_u + scale_g * guidance


class ImageGenerator:
    """A model loaded for generation (UNet, VAE, text encoder on one device)."""

    def __init__(self, model: Model, settings: GenSettings, *, delta: Path | None = None) -> None:
        settings.validate()
        settings = settings.for_model(model)
        self.model, self.settings = model, settings
        self.device = resolve_device(settings.device)
        dtype, autocast_dtype, _ = resolve_precision(settings.precision, self.device)
        self.dtype, self.autocast_dtype = dtype, autocast_dtype  # autocast: for the attacks that back-propagate through the UNet
        self.flow = model.family.prediction_type == "flow"  # SD3 / FLUX.1: a flow-matching transformer (erase.transformer_model)
        # FLUX.1-dev is guidance-distilled: one forward per step, the guidance scale an input of the model (FluxPipeline's way)
        self.config = model.config if model.transformer else {}
        self.distilled = distilled(model.family.name, self.config)
        if self.distilled and (settings.negative or settings.safety):
            raise UsageError(f"{'--negative' if settings.negative else '--safety'}: {model.family.label} samples without a second "
                             "(unconditional) forward, which negative prompts and SLD need; not built for it")
        self.unet = model.load_unet(dtype=dtype, device=self.device)
        self.attention = configure_attention(self.unet, settings.xformers, self.device)
        if delta is not None:
            apply_delta(self.unet, model, delta)
        # fp32 decode, whatever the UNet's precision: SDXL's original VAE overflows in fp16 (only its "fp16-fix" retrain does
        # not, and a file does not say which it carries). One image at a time: at SDXL's 1024 px an fp32 decode of a batch
        # of 4 holds about 2 GiB per activation
        self.vae = model.load_vae(dtype=torch.float32, device=self.device)
        self.vae.enable_slicing()
        self.text = model.load_text_encoder(settings.embeddings)  # textual-inversion tokens (HFI) join the vocabulary
        self.factor = model.latent_factor
        self.size = settings.size or model.default_resolution
        if self.size % self.factor:
            raise UsageError(f"--size must be a multiple of {self.factor} for this model")
        self.scaling = self.vae.config.scaling_factor
        self.shift = self.vae.config.get("shift_factor") or 0.0  # SD3's VAE latents are shifted as well as scaled
        if self.flow:
            if settings.scheduler not in FLOW_SCHEDULERS:
                raise UsageError(f"--scheduler {settings.scheduler}: {model.family.label} samples with flow-matching Euler "
                                 "(--scheduler euler)")
            self.scheduler, self.sampler_name = model.scheduler(), "Euler"
        else:
            cls_name, extra, self.sampler_name = SCHEDULERS[settings.scheduler]
            import diffusers

            base = model.scheduler("DDIMScheduler").config
            self.scheduler = getattr(diffusers, cls_name).from_config({**base, **extra})
        self._cache: dict[str, Conditioning] = {}
        self.keep_text_on_device = False  # erase attack: its text encoder runs at every optimisation step

    def _encode(self, prompts: list[str]) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for start in range(0, len(missing), 64):  # a prompt file of thousands: a bounded batch per text-encoder call
            chunk = missing[start : start + 64]
            cond = self.text.encode(chunk, self.device)
            for i, p in enumerate(chunk):
                self._cache[p] = cond[i : i + 1]
        return Conditioning.cat([self._cache[p] for p in prompts]).to(self.device, self.dtype)

    def offload_text(self) -> None:
        """Move the text encoders off the GPU once the prompts are encoded (SDXL's two towers are 1.4 G parameters in fp32);
        they come back for a prompt not yet encoded. The attacks, which encode at every step, keep them on the device."""
        if self.device.type == "cuda" and not self.keep_text_on_device:
            for enc in self.text.encoders:
                enc.to("cpu")

    def forget_prompts(self) -> None:
        """Drop the encoded prompts (after the text encoder's token rows changed: erase attack)."""
        self._cache.clear()

    @torch.no_grad()
    def latents(self, jobs: list[Job]) -> torch.Tensor:
        """Denoise one batch of jobs; returns final latents (B, C, h, w)."""
        s, sched, sld = self.settings, self.scheduler, self.settings.sld_config
        h = self.size // self.factor
        shape = (self.vae.config.latent_channels if self.flow else self.unet.config.in_channels, h, h)
        # each image's noise comes from its own seed, so batching changes an image only by float reduction order (a few pixels)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(j.seed)) for j in jobs])
        set_sampling_timesteps(self.model.family.name, sched, s.steps, h)
        # latents stay fp32 between steps; only the UNet's input is cast (a flow's noise is unscaled)
        x = (x * getattr(sched, "init_noise_sigma", 1.0)).to(self.device)
        b = len(jobs)
        # FLUX.1-dev always, and a FLUX.1 without a guidance embedder at a scale of 1 or less (FluxPipeline's schnell)
        if one_forward(self.model.family.name, self.config, [j.guidance for j in jobs], sld is not None):
            return self._one_forward_latents(x, jobs)
        conds = [self._encode([j.negative for j in jobs]), self._encode([j.prompt for j in jobs])]
        if sld is not None:
            conds.append(self._encode([s.safety_concept] * b))
        cond = Conditioning.cat(conds)
        scale_g = torch.tensor([j.guidance for j in jobs], device=self.device, dtype=torch.float32).view(b, 1, 1, 1)
        state: dict = {}
        gen = torch.Generator().manual_seed(jobs[0].seed)  # only ancestral samplers draw from it
        for i, t in enumerate(sched.timesteps):
            x_in = (sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x).to(self.dtype)
            out = predict(self.unet, torch.cat([x_in] * len(conds)), t, cond, self.size).float()
            parts = out.chunk(len(conds))
            e_s = parts[2] if sld is not None else None
            pred = sld_guidance(parts[0], parts[1], e_s, scale_g, i, sld, state)
            extra = {"generator": gen} if "generator" in sched.step.__code__.co_varnames else {}
            x = sched.step(pred, t, x, **extra).prev_sample
        return x

    def _one_forward_latents(self, x: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """FLUX.1: each step one forward on the prompt, the job's guidance scale the model's input where it has a guidance
        embedder (dev)."""
        cond = self._encode([j.prompt for j in jobs])
        scale = torch.tensor([j.guidance for j in jobs], device=self.device, dtype=torch.float32)
        for t in self.scheduler.timesteps:
            v = predict(self.unet, x.to(self.dtype), t, cond, self.size, guidance=scale).float()
            x = self.scheduler.step(v, t, x).prev_sample
        return x

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        img = self.vae.decode(latents.float() / self.scaling + self.shift).sample
        arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    def generate(self, jobs: list[Job], on_image=None) -> list[Image.Image]:
        # every prompt of the run in one text-encoder pass, then the encoders leave the GPU for the denoising
        texts = [t for j in jobs for t in (j.prompt, j.negative)] + ([self.settings.safety_concept] if self.settings.sld_config else [])
        self._encode(texts)
        self.offload_text()
        images = []
        for i in range(0, len(jobs), self.settings.batch):
            chunk = jobs[i : i + self.settings.batch]
            for job, im in zip(chunk, self.decode(self.latents(chunk))):
                images.append(im)
                if on_image:
                    on_image(job, im)
        return images

    def parameters_text(self, job: Job, model_hash: str) -> str:
        return parameters_text(job, self.settings, self.size, self.model.path, model_hash)


def parameters_text(job: Job, settings: GenSettings, size: int, model_path: Path, model_hash: str) -> str:
    """A1111-style 'parameters' text, which A1111, ComfyUI and image browsers read."""
    lines = [job.prompt]
    if job.negative:
        lines.append(f"Negative prompt: {job.negative}")
    fields = [f"Steps: {settings.steps}", f"Sampler: {SCHEDULERS[settings.scheduler][2]}", f"CFG scale: {job.guidance:g}",
              f"Seed: {job.seed}", f"Size: {size}x{size}", f"Model hash: {model_hash[:10]}", f"Model: {model_path.stem}"]
    if settings.embeddings:  # A1111 records the embeddings a prompt used the same way
        fields.append('TI hashes: "' + ", ".join(_ti_hash(Path(p)) for p in settings.embeddings) + '"')
    if settings.sld_config is not None:
        fields.append(f"Safety: {settings.safety or 'sld-custom'} ({settings.safety_concept[:60]})")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def _ti_hash(path: Path) -> str:
    """"token: sha256[:12]" of an embedding file, read and hashed once per file version (this runs for every image)."""
    st = path.stat()
    return _ti_hash_of(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _ti_hash_of(path: str, mtime_ns: int, size: int) -> str:
    from erase.checkpoint.write import sha256_file
    from erase.embeddings import load_embedding

    return f"{load_embedding(Path(path)).token}: {sha256_file(Path(path))[:12]}"


def apply_delta(unet, model: Model, delta_path: Path) -> None:
    """Add an `erase run --delta` file to the UNet in memory (no file written)."""
    from erase.checkpoint.formats import open_checkpoint

    delta = open_checkpoint(delta_path)
    if delta.metadata.get("erase.kind") != "delta":
        raise EraseError(f"{delta_path}: not an erase delta file (no erase.kind=delta metadata)")
    if delta.metadata.get("erase.family") not in (None, model.family.name):
        raise EraseError(f"{delta_path}: a {delta.metadata['erase.family']} delta cannot apply to a {model.family.name} model")
    if model.transformer:  # SD3 / FLUX.1: the delta is under the file's fused names; add it parameter by parameter
        from erase.merge import open_target, parameter_deltas

        params = dict(unet.named_parameters())
        with torch.no_grad():
            for name, d in parameter_deltas(open_target(model.path), {k: delta.get(k).float() for k in delta.keys()}).items():
                p = params[name]
                p.data = (p.float() + d.to(p.device)).to(p.dtype)
        return
    by_file_key = {model.unet_file_key(n): p for n, p in unet.named_parameters()}
    with torch.no_grad():
        for key in delta.keys():
            if key not in by_file_key:
                raise EraseError(f"{delta_path}: tensor {key} has no counterpart in {model.path.name}")
            p = by_file_key[key]
            d = delta.get(key)
            if tuple(d.shape) != tuple(p.shape):
                raise EraseError(f"{delta_path}: {key} has shape {list(d.shape)}, the model {list(p.shape)}")
            p.data = (p.float() + d.float().to(p.device)).to(p.dtype)  # a new tensor: p may share the file's memory


def jobs_for(specs, settings: GenSettings, *, n: int, seed: int) -> list[Job]:
    """n images per prompt; seeds from the prompt file when given, else seed, seed+1, ..."""
    jobs = []
    for spec in specs:
        base = spec.seed if spec.seed is not None else seed
        for k in range(n):
            jobs.append(Job(spec.prompt, base + k, spec.guidance if spec.guidance is not None else settings.guidance, settings.negative))
    return jobs


def slug(text: str, limit: int = 40) -> str:
    s = "".join(c if c.isalnum() else "-" for c in text.lower())
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-")[:limit] or "empty"


def image_name(index: int, job: Job) -> str:
    return f"{index:04d}-{slug(job.prompt)}-s{job.seed}.png"


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name("." + path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def grid(images: list[Image.Image], labels: list[str], title: str = "") -> Image.Image:
    """One row of tiles with a caption under each (model names) and an optional title line."""
    from PIL import ImageDraw

    w, h = images[0].size
    tile = max(w, 128)
    pad = 18
    top = pad if title else 0
    canvas = Image.new("RGB", (tile * len(images), top + tile + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title[:120], fill="black")
    for i, (im, label) in enumerate(zip(images, labels)):
        canvas.paste(im.resize((tile, tile), Image.NEAREST if w < tile else Image.BICUBIC), (i * tile, top))
        draw.text((i * tile + 4, top + tile + 3), label[: tile // 7], fill="black")
    return canvas


def run_generate(models: list[Path], specs, settings: GenSettings, *, out: Path, n: int, seed: int,
                 delta: Path | None = None, prediction_type: str | None = None, progress=None, text_encoders: Path | None = None) -> dict:
    """Generate every job through each model in turn (one model in memory at a time).

    Writes `out/<model stem>/<index>-<prompt>-s<seed>.png`; with several models also one grid per
    image (`out/grid-<index>.png`) and `out/index.html`. Returns a summary dict.
    """
    from erase.checkpoint.write import sha256_file
    from erase.models import truncated_prompts
    from erase.transformer_model import open_any_model

    opened = [open_any_model(path, prediction_type, text_encoders) for path in models]  # headers only: a refused file leaves no folder behind
    settings = settings.for_model(opened[0])  # every model draws the same jobs: MODEL's family says the default scale
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(specs, settings, n=n, seed=seed)
    labels = _labels(models)
    folders, files, long, notes = [], [], {}, []
    for index, (path, label, model) in enumerate(zip(models, labels, opened)):
        long.update(truncated_prompts(model.family, job_prompts(jobs, settings)))
        gen = ImageGenerator(model, settings, delta=delta if index == 0 else None)  # --delta belongs to MODEL, not to --compare
        notes += [f"{label}: {note}" for note in getattr(model, "notes", [])]  # what a transformer file's loading left out
        model_hash = sha256_file(path)
        folder = out / label
        folder.mkdir(exist_ok=True)
        names: list[str] = []

        def save(job, image, names=names, folder=folder, size=gen.size, model_path=model.path, model_hash=model_hash):
            # holds no reference to `gen`: the next model must not load while this one is still alive
            name = image_name(len(names), job)
            save_png(image, folder / name, parameters_text(job, settings, size, model_path, model_hash))
            names.append(name)
            if progress:
                progress()

        gen.generate(jobs, on_image=save)
        folders.append(folder)
        files.append(names)
        del gen, save
        gc.collect()  # one model in memory at a time: free this one's UNet and VAE before the next loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    grids = []
    if len(models) > 1:
        for i, job in enumerate(jobs):
            tiles = [Image.open(folder / names[i]) for folder, names in zip(folders, files)]
            g = out / f"grid-{i:04d}.png"
            grid(tiles, labels, f"{job.prompt}  (seed {job.seed})").save(g)
            grids.append(g.name)
        _write_index(out, jobs, grids, labels)
    return {"out": str(out), "images": sum(len(f) for f in files), "models": labels, "grids": grids, "truncated_prompts": long,
            "notes": notes}


def job_prompts(jobs: list[Job], settings: GenSettings) -> list[str]:
    """Every text the jobs encode: prompts, negative prompts and, with SLD, the safety concept."""
    texts = [t for j in jobs for t in (j.prompt, j.negative)]
    return texts + ([settings.safety_concept] if settings.sld_config else [])


def _labels(models: list[Path]) -> list[str]:
    labels = []
    for p in models:
        label = slug(p.stem if p.is_file() else p.name, 60)
        while label in labels:
            label += "-b"
        labels.append(label)
    return labels


def _write_index(out: Path, jobs: list[Job], grids: list[str], labels: list[str]) -> None:
    import html

    rows = "\n".join(f'<figure><img src="{g}"><figcaption>{html.escape(j.prompt)} &middot; seed {j.seed}</figcaption></figure>'
                      for g, j in zip(grids, jobs))
    (out / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>erase: " + html.escape(" vs ".join(labels)) + "</title>"
        "<style>body{font-family:sans-serif}img{image-rendering:pixelated;max-width:100%}figure{display:inline-block;margin:8px}</style>"
        f"<h1>{html.escape(' vs '.join(labels))}</h1>\n{rows}\n")
