# The README's two commands: `make train` (the main job) and `make test` (everything CI checks).
# Each sets up the pinned environment in .venv first; `make setup` alone does only that.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup train test gpu-check
setup: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements/lock.txt -e ".[dev,xla]"
	touch $(STAMP)

train: setup
	$(BIN)/vishwamai train

test: setup
	bash scripts/test.sh

# Every GPU goal in one run (one H100/H200); SMOKE=1 runs it at toy sizes on the CPU, as CI does.
gpu-check: setup
	$(BIN)/python scripts/gpu_check.py $(if $(SMOKE),--smoke)
