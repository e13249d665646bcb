# Shortcuts; the README's commands do the same with nothing but Python.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint bench
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup          ## the main job: merge on the built-in benchmark
	$(BIN)/tint merge

test: setup         ## lint, then the test suite (what CI runs)
	$(BIN)/ruff check tintcli tests
	$(BIN)/python -m pytest -q

bench: setup        ## eval throughput, adaptation step cost, memory (a benchmark, not a test)
	$(BIN)/tint bench

lint: setup
	$(BIN)/ruff check tintcli tests
