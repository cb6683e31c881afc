# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs the project into it, editable.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# Tiers run in separate processes, and the statistical and reference tests one file per
# process: the Dask tests start clusters and threads, and a long-lived process that compiles
# many XLA programs crashed inside XLA's CPU compiler here (twice: a segfault in
# backend_compile_and_load after ~25 statistical tests); small processes keep the state small.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit --ignore=tests/unit/test_reduce_backends.py
	$(BIN)/python -m pytest -q tests/unit/test_reduce_backends.py tests/property
	set -e; for f in tests/reference/test_*.py tests/statistical/test_*.py; do \
		echo "$$f"; $(BIN)/python -m pytest -q "$$f"; done

clean:
	rm -rf $(VENV) demo-out
