# Shortcuts; the README's commands do the same with nothing but Python.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup          ## the main job: merge on the built-in benchmark
	$(BIN)/tint merge

test: setup         ## the test suite
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check tintcli tests
