# make train | make test | make bench — each bootstraps .venv (and the dataset) on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of PyTorch that lies on this machine's disk; on a GPU machine: make TORCH=torch
TORCH  ?= torch==2.13.0
DATA   := /usr/share/datasets/fashion-mnist
CONFIG ?= configs/fast.yaml
ARGS   ?=

.PHONY: setup data test lint format train bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Debian's package holds the four original files; without it reslab downloads them (with checksums).
data:
	@test -f $(DATA)/train-images-idx3-ubyte.gz || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "note: could not install dataset-fashion-mnist; reslab will download Fashion-MNIST on first use"

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

format: $(VENV)/.installed
	$(PY) -m ruff format src tests benchmarks examples
	$(PY) -m ruff check --fix src tests benchmarks examples

test: setup lint
	$(PY) -m pytest -q $(ARGS)

train: setup
	$(VENV)/bin/reslab train --config $(CONFIG) $(ARGS)

bench: setup
	$(VENV)/bin/reslab bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
