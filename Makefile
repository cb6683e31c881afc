# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs the project into it, editable.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# Tiers run in separate processes: the Dask tests start clusters and threads, and a
# long-lived process that also compiles many XLA programs crashed once here inside
# XLA's CPU compiler; separate processes keep each tier's state small.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit --ignore=tests/unit/test_reduce_backends.py
	$(BIN)/python -m pytest -q tests/unit/test_reduce_backends.py tests/property
	$(BIN)/python -m pytest -q tests/reference tests/statistical

clean:
	rm -rf $(VENV) demo-out
