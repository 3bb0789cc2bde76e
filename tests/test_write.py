"""The surgical writer: only replaced tensors change, the rest stays byte-identical."""

import json

import pytest
import torch

from erase.checkpoint.formats import open_checkpoint
from erase.checkpoint.write import check_output_path, provenance, sha256_file, write_checkpoint, write_safetensors
from erase.errors import EraseError, UsageError
from erase.models import open_model, write_config_folder


def _tensor_bytes(ckpt, name):
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def _attn2(ckpt):
    return [k for k in ckpt.keys() if ".attn2." in k and k.startswith("model.diffusion_model.")]


def test_write_changes_only_chosen_tensors(tiny_sd1_fp16_ema, tmp_path):
    src = open_checkpoint(tiny_sd1_fp16_ema)
    chosen = _attn2(src)[:3]
    new = {k: src.get(k).float() + 1.0 for k in chosen}
    out = write_safetensors(src, tmp_path / "o.safetensors", new, metadata={"erase.method": "test"})
    dst = open_checkpoint(out)
    assert set(dst.keys()) == set(src.keys())
    for k in src.keys():
        same = _tensor_bytes(src, k) == _tensor_bytes(dst, k)
        assert same == (k not in chosen), k
    for k in chosen:  # cast to the file's own dtype (fp16), values as given
        assert dst.tensors[k].dtype == "F16"
        assert torch.equal(dst.get(k), (src.get(k).float() + 1.0).half())
    assert dst.metadata["modelspec.title"] == "tiny" and dst.metadata["erase.method"] == "test"


def test_untouched_data_section_is_byte_identical_when_nothing_changes(tiny_sd1, tmp_path):
    src = open_checkpoint(tiny_sd1)
    out = write_safetensors(src, tmp_path / "same.safetensors", {})
    a, b = tiny_sd1.read_bytes(), out.read_bytes()
    start_a = min(t.start for t in src.tensors.values())
    start_b = min(t.start for t in open_checkpoint(out).tensors.values())
    assert a[start_a:] == b[start_b:]


def test_drop_removes_tensors(tiny_sd1_fp16_ema, tmp_path):
    src = open_checkpoint(tiny_sd1_fp16_ema)
    ema = {k for k in src.keys() if k.startswith("model_ema.")}
    out = open_checkpoint(write_safetensors(src, tmp_path / "o.safetensors", {}, drop=ema))
    assert not any(k.startswith("model_ema.") for k in out.keys())
    assert len(out.keys()) == len(src.keys()) - len(ema)


def test_replacement_is_checked(tiny_sd1, tmp_path):
    src = open_checkpoint(tiny_sd1)
    name = _attn2(src)[0]
    with pytest.raises(EraseError, match="shape"):
        write_safetensors(src, tmp_path / "o.safetensors", {name: torch.zeros(3)})
    with pytest.raises(EraseError, match="NaN"):
        write_safetensors(src, tmp_path / "o.safetensors", {name: torch.full(src.shape(name), float("nan"))})
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_output_path_rules(tiny_sd1, tmp_path):
    with pytest.raises(UsageError, match="input"):
        check_output_path(tiny_sd1, tiny_sd1)
    existing = tmp_path / "e.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(UsageError, match="--force"):
        check_output_path(tiny_sd1, existing)
    assert check_output_path(tiny_sd1, existing, force=True) == existing


def test_pickle_input_is_written_as_safetensors(tiny_sd1, tmp_path):
    src = open_checkpoint(tiny_sd1)
    p = tmp_path / "m.ckpt"
    torch.save(src.get_many(src.keys()), p)
    out = open_checkpoint(write_safetensors(open_checkpoint(p), tmp_path / "m.safetensors", {}))
    assert all(torch.equal(out.get(k), src.get(k)) for k in src.keys())


def test_provenance_keeps_history(tiny_sd1, tmp_path):
    src = open_checkpoint(tiny_sd1)
    sha = sha256_file(tiny_sd1)
    first = open_checkpoint(write_safetensors(src, tmp_path / "a.safetensors", {},
                                              metadata=provenance(src, {"method": "sdd", "concepts": ["x"]}, input_sha256=sha)))
    assert first.metadata["erase.input_sha256"] == sha and first.metadata["erase.concepts"] == '["x"]'
    second = open_checkpoint(write_safetensors(first, tmp_path / "b.safetensors", {},
                                               metadata=provenance(first, {"method": "sdd"}, input_sha256="y")))
    assert "erase.concepts" not in second.metadata
    earlier = json.loads(second.metadata["erase.history"])
    assert json.loads(earlier[0]["erase.concepts"]) == ["x"]


def test_written_file_loads_in_diffusers_from_single_file(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = open_model(tiny_sd1)
    name = _attn2(model.ckpt)[0]
    new = {name: model.ckpt.get(name) * 0.5}
    out = write_checkpoint(model.ckpt, tmp_path / "o.safetensors", new, metadata={"erase.method": "test"})
    config = write_config_folder(model, tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    assert len(pipe.tokenizer) == 49408
    ours = open_model(out).load_unet().state_dict()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ours[k]), k


def test_the_writer_falls_back_to_a_plain_copy_when_copy_file_range_fails(tiny_sd1, tmp_path, monkeypatch):
    """Old kernels refuse copy_file_range across file systems (EXDEV): the writer copies with read/write instead, and
    the file is byte for byte what the in-kernel copy writes."""
    import errno
    import os

    ckpt = open_checkpoint(tiny_sd1)
    name = _attn2(ckpt)[0]
    new = {name: ckpt.get(name) + 1}
    write_checkpoint(ckpt, tmp_path / "fast.safetensors", new, metadata={})
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    write_checkpoint(ckpt, tmp_path / "slow.safetensors", new, metadata={})
    assert calls  # the fallback was taken
    assert (tmp_path / "fast.safetensors").read_bytes() == (tmp_path / "slow.safetensors").read_bytes()
