# fisherlab: two commands.
#   make demo   set up a virtual environment and run the main job on the embedded MNIST digits
#   make test   set up the same environment and run the test suite (what .ci/run calls)
#
# TORCH pins the torch wheel. On this project's CPU machines pip finds the CPU build of
# torch 2.13.0 locally. Elsewhere pass an index, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu      (CPU-only, ~200 MB)
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cu126    (CUDA 12.6)
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
STAMP       := $(VENV)/.fisherlab-installed
# Test-only peers for tests/test_curvlinops.py (skipped when absent), installed with --no-deps:
# curvlinops requires backpack-for-pytorch, which requires torchvision (and could pull a CUDA
# torch); curvlinops imports backpack only in curvlinops.experimental, which the tests never load.
# The rest are what curvlinops imports. Not in pyproject's dev extra: pip would resolve backpack.
PEERS       ?= curvlinops-for-pytorch==3.0.1 einops einconv opt-einsum linear_operator
DEMO_OUT    ?= out/demo

.PHONY: setup demo test test-all bench clean

# Real Fashion-MNIST from Debian's dataset-fashion-mnist: apt-get install as root, else apt-get
# download + dpkg-deb -x into data/debian/ (git-ignored); one message and no failure elsewhere.
# Idempotent: a file check when the data are already there.
setup: $(STAMP)
	-@sh data/install_fashion_mnist.sh

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,distributed]"
	-$(PY) -m pip install -q --no-deps $(PEERS)
	touch $@

demo: setup
	$(VENV)/bin/fisherlab demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) analysis/bench/capture_bench.py
	$(PY) analysis/bench/woodbury_bench.py

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
