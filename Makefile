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

BD   := $(VENV)/bin/bard-deploy
RUN  := runs/default

demo: $(STAMP)
	$(BD) train
	$(BD) export --model $(RUN)/b16 --out $(RUN)/export-b16 --int8 --force
	$(BD) export --model runs/source --out $(RUN)/export-source --int8 --force
	$(PY) -c "from bard_deploy.data.synthetic import samples; s = next(samples('test', 1)); \
	    s.image().save('$(RUN)/sample.png'); print('sample:', s.question, '->', s.answer)"
	$(BD) generate --model $(RUN)/export-b16 --prompt "Describe the picture." --image $(RUN)/sample.png --stats
	$(BD) bench --model $(RUN)/export-b16 --ar-model $(RUN)/export-source --variant fp32 --thresholds 0.5,0.7,0.9 --out $(RUN)/bench-fp32
	$(BD) bench --model $(RUN)/export-b16 --ar-model $(RUN)/export-source --variant int8 --thresholds 0.5,0.7,0.9 --out $(RUN)/bench-int8

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
