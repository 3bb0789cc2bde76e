"""Conformance: every command on files laid out like the public releases (tests/release_layouts.py).

The files come from an independent description of the layouts (not from erase's exporter): the real tensor
names and extras (position ids, DDPM buffers, EMA scalars and weights, OpenCLIP towers as released) at tiny
width. Each layout goes through inspect, run, generate, evaluate, merge and LoRA export, and the outputs are
checked against what the layout itself says: only attn2 tensors change, every extra stays byte-identical.
"""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from erase.checkpoint.formats import open_checkpoint
from erase.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from release_layouts import Layout, sd15, sd21_v, sdxl_base  # noqa: E402

runner = CliRunner()
TINY = dict(width=32, vae_width=32)
LAYOUTS = {  # name -> (layout, dtype, format)
    "sd15-emaonly-fp16": (lambda: sd15(text_width=32, **TINY), torch.float16, "safetensors"),
    "sd15-emaonly-fp32": (lambda: sd15(text_width=32, **TINY), torch.float32, "safetensors"),
    "sd15-pruned-ema": (lambda: sd15(text_width=32, ema_weights=True, **TINY), torch.float32, "safetensors"),
    "sd21-768-v": (lambda: sd21_v(text_width=32, **TINY), torch.float32, "safetensors"),
    # the two towers' widths differ as in the release: diffusers tells them apart by width
    "sdxl-base": (lambda: sdxl_base(clip_l=32, clip_g=64, **TINY), torch.float16, "safetensors"),
    "sd15-a1111-ckpt": (lambda: sd15(text_width=32, **TINY), torch.float32, "ckpt"),
}
SIZE = "64"  # 4 UNet levels need latents divisible by 8: 64 px with the 8x VAE


def _write_lightning_ckpt(state: dict, path: Path) -> None:
    """An A1111-era .ckpt as PyTorch Lightning saved them: the weights under "state_dict" beside global_step, epoch,
    the Lightning version and a callbacks dict keyed by the ModelCheckpoint class (which erase must not import)."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)
    cls = type("ModelCheckpoint", (), {"__module__": name})
    module.ModelCheckpoint = cls
    saved = {k: sys.modules.get(k) for k in ("pytorch_lightning", "pytorch_lightning.callbacks", name)}
    sys.modules.update({"pytorch_lightning": types.ModuleType("pytorch_lightning"),
                        "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"), name: module})
    try:
        torch.save({"epoch": 6, "global_step": 840000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
                    "callbacks": {cls: {"monitor": None, "best_model_score": None, "best_model_path": "", "dirpath": "/logs"}}}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("releases")
    cache: dict[str, tuple[Path, Layout]] = {}

    def make(name: str) -> tuple[Path, Layout]:
        if name not in cache:
            build, dtype, fmt = LAYOUTS[name]
            layout = build()
            state = layout.state_dict(dtype)
            path = folder / f"{name}.{fmt}"
            if fmt == "ckpt":
                _write_lightning_ckpt(state, path)
            else:
                save_file(state, str(path))
            cache[name] = (path, layout)
        return cache[name]

    return make


def _raw(ckpt, name: str) -> bytes:
    if ckpt.format != "safetensors":
        t = ckpt.get(name).contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def _ok(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (args[0], r.output)
    return r


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_command_works_on_a_release_layout(release_file, name, tmp_path):
    path, layout = release_file(name)
    extras = {s.name for s in layout.specs() if not s.name.startswith(("model.diffusion_model.", "first_stage_model."))
              and s.kind in ("position_ids", "buffer", "scalar", "count")}

    info = json.loads(_ok(["inspect", str(path), "--json"]).output)
    assert info["family"] == {"sd21-768-v": "sd2", "sdxl-base": "sdxl"}.get(name, "sd1")
    assert info["unknown_tensors"] == [] and extras <= set(info["extra_tensors"])
    assert info["attn2_tensors"] == len(layout.attn2_names())

    out = tmp_path / "erased.safetensors"
    # one named concept held (the automatic choice is the text encoder's, tested in test_preserve / test_run)
    # --train xattn: every attn2 projection trained, so that each kind of tensor is written back into the layout
    _ok(["run", str(path), "-c", "a cat", "--steps", "2", "--sample-steps", "2", "--lr", "1e-2", "--ema-decay", "0", "--train", "xattn",
         "--resolution", SIZE, "--device", "cpu", "--preserve", "a dog", "-o", str(out)])
    src, dst = open_checkpoint(path), open_checkpoint(out)
    ema_weights = {k for k in src.keys() if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")}
    assert bool(ema_weights) == layout.ema_weights
    assert set(dst.keys()) == set(src.keys()) - ema_weights  # only the un-erased EMA copy is left out
    changed = {k for k in dst.keys() if _raw(src, k) != _raw(dst, k)}
    assert changed == layout.attn2_names()  # every attn2 tensor trained, nothing else touched
    assert all(_raw(src, k) == _raw(dst, k) for k in extras)  # position ids, buffers, EMA scalars: byte-identical
    file_dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    assert all(dst.tensors[k].dtype == file_dtype[src.get(k).dtype] for k in changed)  # written in the input's own dtype
    if ema_weights:
        assert "model_ema.decay and model_ema.num_updates are kept" in dst.metadata["erase.dropped"]

    closed = tmp_path / "uce.safetensors"  # the closed-form method on the same layout: only attn2 keys and values change
    _ok(["run", str(path), "--method", "uce", "-c", "a cat", "--preserve", "a dog", "-o", str(closed)])
    u = open_checkpoint(closed)
    assert {k for k in u.keys() if _raw(src, k) != _raw(u, k)} == {k for k in layout.attn2_names() if ".to_k." in k or ".to_v." in k}

    _ok(["generate", str(path), "--compare", str(out), "-p", "a cat", "--steps", "2", "--size", SIZE, "--device", "cpu",
         "-o", str(tmp_path / "images")])
    assert len(list((tmp_path / "images").rglob("*.png"))) >= 2

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    _ok(["evaluate", str(out), "--base", str(path), "--prompts", str(prompts), "--steps", "2", "--size", SIZE,
         "--device", "cpu", "-o", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["erased"]["images"] == 2 and report["base_results"]["images"] == 2

    merged = tmp_path / "merged.safetensors"
    _ok(["merge", str(path), str(out), "--base", str(path), "-o", str(merged)])
    m = open_checkpoint(merged)
    assert {k for k in m.keys() if _raw(src, k) != _raw(m, k)} == layout.attn2_names()  # the whole erasure, nothing else
    assert all(_raw(src, k) == _raw(m, k) for k in extras)

    lora = tmp_path / "erasure.lora.safetensors"
    _ok(["merge", str(path), str(out), "--base", str(path), "--lora-rank", "2", "-o", str(lora)])
    keys = open_checkpoint(lora).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    attn2_linears = {k for k in layout.attn2_names() if k.endswith(".weight")}
    assert len([k for k in keys if k.endswith(".lora_down.weight")]) == len(attn2_linears)  # one LoRA pair per attn2 linear


def test_diffusers_fp16_variant_folder(release_file, tmp_path):
    """A diffusers folder whose weights are only the `*.fp16.safetensors` variant files (as `save_pretrained(variant=
    "fp16")` writes them): erase reads them and writes the erased weights back into the variant file."""
    from diffusers import StableDiffusionPipeline

    path, _ = release_file("sd15-emaonly-fp32")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(_config_folder(path, tmp_path)), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    folder = tmp_path / "pipe"
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()

    info = json.loads(_ok(["inspect", str(folder), "--json"]).output)
    assert info["family"] == "sd1" and info["format"] == "diffusers"
    out = tmp_path / "erased"
    _ok(["run", str(folder), "-c", "a cat", "--steps", "2", "--sample-steps", "2", "--lr", "1e-2", "--ema-decay", "0",
         "--resolution", SIZE, "--device", "cpu", "-o", str(out)])
    src = open_checkpoint(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    dst = open_checkpoint(out / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    changed = {k for k in src.keys() if _raw(src, k) != _raw(dst, k)}
    assert changed and all(".attn2." in k for k in changed) and dst.dtypes() == {"F16": len(dst.keys())}
    erased = StableDiffusionPipeline.from_pretrained(out, variant="fp16", dtype=torch.float16, local_files_only=True)
    k = sorted(changed)[0]
    assert torch.equal(erased.unet.state_dict()[k], dst.get(k))
    _ok(["generate", str(out), "-p", "a cat", "--steps", "2", "--size", SIZE, "--device", "cpu", "-o", str(tmp_path / "img")])


def _config_folder(path: Path, tmp_path: Path) -> Path:
    from erase.models import open_model, write_config_folder

    return write_config_folder(open_model(path), tmp_path / "config")


@pytest.mark.parametrize("name", ["sd15-emaonly-fp32", "sd21-768-v", "sdxl-base"])
def test_components_match_diffusers_single_file_loader(release_file, name, tmp_path):
    """erase's UNet, VAE and text encoders equal what diffusers' own `from_single_file` loads from the same file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from erase.models import open_model

    path, _ = release_file(name)
    cls = StableDiffusionXLPipeline if name == "sdxl-base" else StableDiffusionPipeline
    extra = {} if name == "sdxl-base" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_single_file(str(path), config=str(_config_folder(path, tmp_path)), local_files_only=True, **extra)
    model = open_model(path)
    theirs = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    ours = {"unet": model.load_unet(), "vae": model.load_vae()}
    text = model.load_text_encoder()
    ours["text_encoder"] = text.encoders[0]
    if name == "sdxl-base":
        theirs["text_encoder_2"], ours["text_encoder_2"] = pipe.text_encoder_2, text.encoders[1]
    for comp, module in theirs.items():
        want = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        got = ours[comp].state_dict()
        assert set(got) == set(want), (comp, sorted(set(got) ^ set(want))[:4])
        for k, v in want.items():
            assert torch.equal(got[k], v), (comp, k)


def test_unknown_tensors_are_named_and_nothing_is_written(release_file, tmp_path):
    path, layout = release_file("sd15-emaonly-fp16")
    state = open_checkpoint(path).get_many(open_checkpoint(path).keys())
    state.update({"embedding_manager.x": torch.zeros(1), "cond_stage_model.extra.y": torch.zeros(1),
                  "zz.a": torch.zeros(1), "zz.b": torch.zeros(1)})
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["run", str(bad), "-c", "x", "--steps", "1", "-o", str(out)])
    assert r.exit_code == 1 and not out.exists()
    line = " ".join(r.output.split())
    assert "Stable Diffusion 1.x" in line and "embedding_manager.x" in line and "(+1 more)" in line
    assert len(r.output.strip().splitlines()) <= 3 and "Traceback" not in r.output
