# Set-up and the two commands of README.md. Needs only Python 3.11 on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tl-installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	@# the build backend's notes (an editable-install banner) go to a log, shown only if pip fails
	$(BIN)/pip install --quiet -e ".[dev]" 2> $(VENV)/pip-install.log || { cat $(VENV)/pip-install.log; exit 1; }
	touch $(STAMP)

install: $(STAMP)

## demo: set up, then run the main job on the embedded digits suite
demo: $(STAMP)
	$(BIN)/python -m workflows.compare

## test: set up, then run the whole test suite (slow multi-worker tests included)
test: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

## test-fast: the fast part alone (units, bad input, a few small Ray runs; about 3 minutes)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
