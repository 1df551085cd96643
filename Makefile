# make test: create .venv if missing, install makima with its dev and claude extras (the
# claude_code adapter is tested through the real Claude Agent SDK), lint, run every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-faults fault-tools fuzz bench bench-caching bench-console lint unit clean sandbox-tools

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,claude]'
	touch $(STAMP)

# Agent commands and checks run under bubblewrap (makima/sandbox.py): Debian's
# `bubblewrap`, installed with apt-get when missing and we are root.
sandbox-tools:
	@command -v bwrap >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null; } \
	  || { echo "bubblewrap (bwrap) is missing and cannot be installed here (needs apt-get as root);" \
	            "install it: makima confines every agent command and check with it" >&2; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint sandbox-tools
	$(BIN)/pytest -m "not faults"

# The multi-worker suite hides each worker's home from the others with `unshare -m`
# (util-linux), installed with apt-get when missing and we are root.
fault-tools:
	@command -v unshare >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends util-linux >/dev/null; } \
	  || { echo "unshare (util-linux) is missing and cannot be installed here (needs apt-get as root)" >&2; exit 1; }

# Crashes, outages and runaway agents against real processes (a few minutes).
test-faults: $(STAMP) sandbox-tools fault-tools
	$(BIN)/pytest -m faults tests/test_faults.py tests/test_routing.py tests/test_many_workers.py \
	  tests/test_payload_sizes.py tests/test_restart_queries.py

# The interleaving fuzzer at length: thousands of random directives steered by random
# commands (make test runs 250 of them, and 50 more with worker restarts). A failure
# prints MAKIMA_FUZZ_SEED=...
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-2000} FUZZ_RESTART_EXAMPLES=$${FUZZ_RESTART_EXAMPLES:-500} \
	  FUZZ_BATCH=$${FUZZ_BATCH:-50} $(BIN)/pytest tests/test_fuzz_commands.py

# Benchmarks against a local dev server: prints tables, writes bench/results/<date>.json.
bench: $(STAMP) sandbox-tools
	$(BIN)/python -m bench

# What prompt caching saves the anthropic agent: a scripted 20-turn step, billed by
# the caching rules of the suite's Messages API server (no network, a few seconds).
bench-caching: $(STAMP)
	$(BIN)/python -m bench.caching

# The console's render times on 1,000 directives in an embedded Postgres.
bench-console: $(STAMP)
	$(BIN)/python -m bench.console

demo: $(STAMP) sandbox-tools
	$(BIN)/python starter.py demo

unit: $(STAMP)
	$(BIN)/pytest tests/test_models.py tests/test_dag.py tests/test_policy.py

clean:
	rm -rf $(VENV) .makima .pytest_cache
