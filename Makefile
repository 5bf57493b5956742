# Build / test plumbing for dal.  GNU make >= 4.3, recipes run by /bin/sh.
#
#   make venv    create .venv (Python >= 3.11) and install -e '.[test]'
#   make demo    run `dal demo` (SQLite only; needs no server)
#   make test    venv + make sure the servers are up + pytest + lint
#   make lint    ruff + mypy
#   make bench   `dal bench --json bench.json $(BENCH_ARGS)`
#   make clean   remove .venv, caches and build output
#
# Variables: PYTHON (interpreter used to create .venv, default python3),
# PYTEST_ARGS (extra pytest arguments), BENCH_ARGS (extra bench arguments).

SHELL := /bin/sh
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
TEST_STAMP := $(VENV)/.installed-test
DEMO_STAMP := $(VENV)/.installed-demo
PYTEST_ARGS ?=
BENCH_ARGS ?=

# Exits non-zero, with a message, unless interpreter $(1) is Python >= 3.11.
CHECK_PY = $(1) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	echo "error: Python >= 3.11 is required, but '$(1)' is: `$(1) --version 2>&1`" >&2; \
	echo "       pass a newer one, e.g. 'make PYTHON=python3.12 ...' ('make clean' first if .venv is old)" >&2; \
	exit 1; }

.PHONY: venv demo test lint bench clean

venv: $(TEST_STAMP)

# Create the virtualenv only when it is missing.
$(PY):
	@$(call CHECK_PY,$(PYTHON))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# (Re)install only when pyproject.toml is newer than the stamp.
$(TEST_STAMP): pyproject.toml | $(PY)
	@$(call CHECK_PY,$(PY))
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# The demo needs only the SQLite extra; an up-to-date test install has it too.
$(DEMO_STAMP): pyproject.toml | $(PY)
	@$(call CHECK_PY,$(PY))
	@if [ -f $(TEST_STAMP) ] && [ ! pyproject.toml -nt $(TEST_STAMP) ]; then \
		echo "reusing the test install in $(VENV)"; \
	else \
		echo "$(PY) -m pip install -e '.[sqlite]'"; \
		$(PY) -m pip install -e '.[sqlite]' || exit 1; \
	fi
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/dal demo

test: venv
	$(PY) scripts/ensure_services.py
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory lint

lint: venv
	$(BIN)/ruff check dal tests scripts
	$(BIN)/mypy

bench: venv
	$(PY) scripts/ensure_services.py
	$(BIN)/dal bench --json bench.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
