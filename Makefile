# Two entry points (see README): `make bench` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: setup bench test
setup: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/vitprune bench

test: $(STAMP)
	$(PY) -m pytest -q
