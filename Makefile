# The README's two commands: `make run` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3

export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= INFO

.PHONY: install browser run test repro report clean serve serve-stop

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[triton,dev,nlp,cpu]'
	@touch $(STAMP)

install: $(STAMP)

## Run the default pipeline end to end (MNIST-5k) through the Prefect flow.
run: install
	slimforge run --params params/default.yaml

## Headless Chromium for the report's browser test (Debian's package, as root or via sudo).
## Without either, or without apt-get, it says so and the browser test skips itself.
browser:
	@command -v chromium >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "browser: chromium missing, no root or sudo: the browser test will be skipped"; exit 0; fi; \
	command -v apt-get >/dev/null 2>&1 || { echo "browser: chromium missing, no apt-get: the browser test will be skipped"; exit 0; }; \
	$$sudo apt-get update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
	echo "browser: apt-get could not install chromium: the browser test will be skipped"

## Run every test.
test: install browser
	pytest -q

## The same pipeline through DVC alone.
repro: install
	dvc repro

report: install
	slimforge report

## Start the local stack on 127.0.0.1: Prefect server (:4200), a process worker on pool
## slimforge-process, SeaweedFS S3 (:8333) as the DVC default remote; state and logs in .serve/.
serve: install
	bash infra/serve.sh start

## Stop what `make serve` started (and nothing else).
serve-stop:
	bash infra/serve.sh stop

clean:
	rm -rf artifacts reports runs .dvc/cache .dvc/tmp
