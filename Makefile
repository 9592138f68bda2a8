# Quick start: `make demo` (set up + main job on the bundled samples), `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medfusion-installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pin the CPU build of torch before the project so pip never pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medfusion demo --out demo_output

test: $(STAMP)
	$(VENV)/bin/ruff check medfusion pipelines tests
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check medfusion pipelines tests

clean:
	rm -rf $(VENV) demo_output .pytest_cache
