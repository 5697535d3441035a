# One entry point for humans and CI. The virtualenv is made on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLE := examples/flexworker-example-plugin
# A second virtualenv with every runtime dependency at the floor pyproject.toml declares.
MIN_VENV ?= .venv-min
MIN_BIN := $(MIN_VENV)/bin
MIN_STAMP := $(MIN_VENV)/.installed

.PHONY: install test example check check-minimums lint types demo sim clean

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

# The floors in pyproject.toml stay true: install each runtime dependency at exactly its
# floor (dev tools at their newest that fit) and run the tests there.
$(MIN_STAMP): pyproject.toml .ci/minimums.py
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_BIN)/pip install --quiet --upgrade pip
	$(PYTHON) .ci/minimums.py pyproject.toml > $(MIN_VENV)/floors.txt
	$(MIN_BIN)/pip install --quiet -c $(MIN_VENV)/floors.txt -e '.[dev]'
	touch $(MIN_STAMP)

check-minimums: $(MIN_STAMP)
	$(MIN_BIN)/python .ci/minimums.py --check pyproject.toml
	$(MIN_BIN)/pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/flexworker demo --duration 60 --rate 50

sim: $(STAMP)
	$(BIN)/flexworker sim --seed 1 --rate 20

clean:
	rm -rf $(VENV) $(MIN_VENV) .mypy_cache .pytest_cache .ruff_cache
