"""Shared fixtures: tiny single-file checkpoints of each family, built in code, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread, in this process and in every CLI call and subprocess it starts (erase's start-up respects OMP_NUM_THREADS):
# stable timings, and results that two runs on this machine can compare bit for bit. Bit-exact comparisons in this
# suite are only ever between two runs on the same machine (resume, data parallel, regeneration); results compared
# with a reference written elsewhere (another CPU: AMD vs Intel, AVX2 vs AVX-512) use a tolerance, never a digest.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from erase.tiny import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_sd1(tiny_dir):
    return write_tiny_checkpoint(tiny_dir / "sd1.safetensors", "sd1")


@pytest.fixture(scope="session")
def tiny_sd1_fp16_ema(tiny_dir):
    return write_tiny_checkpoint(tiny_dir / "sd1_fp16_ema.safetensors", "sd1", dtype=torch.float16, with_ema=True,
                                 metadata={"modelspec.title": "tiny"})


@pytest.fixture(scope="session")
def tiny_sd2(tiny_dir):
    return write_tiny_checkpoint(tiny_dir / "sd2.safetensors", "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_dir):
    return write_tiny_checkpoint(tiny_dir / "sdxl.safetensors", "sdxl")


@pytest.fixture(scope="session")
def tiny_files(tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


def pytest_collection_modifyitems(config, items):
    """The long end-to-end tests first: spread over workers (pytest -n 2), they then run beside the short ones instead
    of alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
