# The README's two commands: `make run` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= INFO

.PHONY: install run test repro report clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[triton,dev,nlp]'
	@touch $(STAMP)

install: $(STAMP)

## Run the default pipeline end to end (MNIST-5k) through the Prefect flow.
run: install
	slimforge run --params params/default.yaml

## Run every test.
test: install
	pytest -q

## The same pipeline through DVC alone.
repro: install
	dvc repro

report: install
	slimforge report

clean:
	rm -rf artifacts reports runs .dvc/cache .dvc/tmp
