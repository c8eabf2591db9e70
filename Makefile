# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create a local virtual environment in .venv first (once).
#
# torch: on a machine without an NVIDIA GPU the set-up pins the CPU build
# (TORCH_CPU), so pip does not pull a multi-GB CUDA wheel. Where your CPU wheel
# comes from another index, pass it, e.g.  make test TORCH_PIP_ARGS="--index-url URL".
# On a GPU machine whatever torch>=2.1 is already resolvable is kept.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test test-fast flake-check lint typecheck simulate clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_CPU)"; fi
	$(PY) -m pip install --quiet -e ".[test,dev,demo]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/gossip-sgp demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

# The full suite: lint, types, then every test (multi-process training included).
# scripts/ensure-test-tools installs prometheus, tcpdump, nftables and iproute2 for the
# integration tests (Prometheus, CurveZMQ capture, WAN emulator) where it can (root with
# apt-get); it never fails the build.
test: lint typecheck
	-sh scripts/ensure-test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

# The quick loop while developing: skips the multi-process training runs, and runs the rest
# on one pytest process per core (pytest-xdist; most of these tests wait on sockets, threads
# and timers rather than compute). `make test` runs everything in one process.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -n auto $(PYTEST_ARGS)

# Every statistical or timing-sensitive test (marker `measured`) RUNS times beside LOAD
# busy processes: pass rates and the measured values against each gate (docs/testing.md).
# FLAKE_ARGS narrows it, e.g. FLAKE_ARGS="tests/test_stragglers.py" or FLAKE_ARGS="-k loss".
RUNS ?= 10
LOAD ?= 0
flake-check: $(VENV)/.installed
	$(PY) scripts/flake_check.py --runs $(RUNS) --load $(LOAD) $(FLAKE_ARGS)

simulate: $(VENV)/.installed
	$(VENV)/bin/gossip-sgp simulate --nodes 64 --rounds 20

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
