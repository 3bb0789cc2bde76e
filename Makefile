# erase: `make test` and `make demo` set up .venv on first use, then run.
#
# TORCH picks the PyTorch build. The default installs the CPU wheel (no multi-GB CUDA
# download on machines without an NVIDIA GPU). GPU users: install the CUDA build first,
#   python -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124
# or run `make TORCH=torch test`; an installed torch is kept as it is.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check erase tests examples benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
