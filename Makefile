# One entry point for humans and CI. The virtualenv is made on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLE := examples/flexworker-example-plugin

.PHONY: install test example check lint types demo sim clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check worker handlers tests examples bench
	$(BIN)/ruff format --check worker handlers tests examples bench

types: $(STAMP)
	$(BIN)/mypy worker handlers

test: $(STAMP)
	$(BIN)/pytest

# The example plugin installs like any third-party plugin and runs its own tests.
example: $(STAMP)
	$(BIN)/pip install --quiet --no-deps -e $(EXAMPLE)
	cd $(EXAMPLE) && ../../$(BIN)/pytest

check: lint types test example

demo: $(STAMP)
	$(BIN)/flexworker demo --duration 60 --rate 50

sim: $(STAMP)
	$(BIN)/flexworker sim --seed 1 --rate 20

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
