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

.PHONY: test demo lint clean venv chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	touch $(STAMP)

# The labelling page's browser test drives Debian's chromium through Playwright (Playwright's own browser download
# needs the internet). As root where apt-get exists it is installed once, quietly; anywhere else the test is
# skipped and pytest (-rs) says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium with apt-get (for tests/test_feedback_label.py's browser test)"; \
	    apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -q >/dev/null; \
	    log=$$(mktemp); DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >$$log 2>&1 \
	      || { tail -n 5 $$log; echo "chromium could not be installed; the browser test will be skipped"; }; rm -f $$log; \
	  else \
	    echo "chromium is not installed (installing it needs root and apt-get); the browser test will be skipped"; \
	  fi; }

# -n auto: one pytest worker per core (each test uses one thread; the long end-to-end tests start first)
test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check erase tests examples benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
