# The README's two commands: `make train` (the main job) and `make test` (everything CI checks).
# Each sets up the pinned environment in .venv first; `make setup` alone does only that.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup train test
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
