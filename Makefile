# Two commands do all set-up on a fresh machine:
#   make demo   the main job on the embedded default (grows as the pipeline lands)
#   make test   the test suite (CPU, offline)
# Each creates .venv, installs torch==2.13.0 *first* (the CPU wheel on disk here; a bare `torch`
# requirement would pull a multi-GB CUDA build), then the project with its dev extra.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/bard-deploy train
	$(VENV)/bin/bard-deploy export --int8
	$(VENV)/bin/bard-deploy generate
	$(VENV)/bin/bard-deploy bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
