# make test: create .venv if missing, install makima with its dev and claude extras (the
# claude_code adapter is tested through the real Claude Agent SDK), lint, run every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-faults bench lint unit clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,claude]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -m "not faults"

# Crashes, outages and runaway agents against real processes (a few minutes).
test-faults: $(STAMP)
	$(BIN)/pytest -m faults tests/test_faults.py

# Benchmarks against a local dev server: prints tables, writes bench/results/<date>.json.
bench: $(STAMP)
	$(BIN)/python -m bench

demo: $(STAMP)
	$(BIN)/python starter.py demo

unit: $(STAMP)
	$(BIN)/pytest tests/test_models.py tests/test_dag.py tests/test_policy.py

clean:
	rm -rf $(VENV) .makima .pytest_cache
