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

.PHONY: test demo lint clean venv chromium gpu-check

venv: $(STAMP)

# pip byte-compiles every module it installs, one at a time (45 of a fresh install's 79 s on 2 cores). Installing with
# --no-compile and compiling afterwards on every core does the same work in parallel; leaving it to first import instead
# made the suite slower (each test worker compiled the same modules at once). compileall's status is ignored: a few
# packages ship files that never compile (pip skips them the same way).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --no-compile "$(TORCH)"
	$(BIN)/python -m pip install -q --no-compile -e ".[dev,eval]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
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

# -n auto: one pytest worker per core (each test uses one thread; the long end-to-end tests start first); worksteal: a
# worker that runs out takes queued tests from the other, so the run does not end on one worker's backlog
test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n auto --dist worksteal

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

# The first run on a CUDA GPU (issue 38): precision tests on the device, one SD 1.5-size erasure at 512 px, a record for
# the README's table (benchmarks/gpu_check.py). Without a GPU it says so in one line.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check erase tests examples benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
