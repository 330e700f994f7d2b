# Two entry points (see README): `make bench` and `make test`. Both install the locked set (uv.lock) on first use.
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .uv/bin/uv
VENV := .venv
STAMP := $(VENV)/.installed

# uv itself, pinned, in a project-local folder: no system install, no root needed.
$(UV):
	$(PYTHON) -m pip install -q --disable-pip-version-check --target .uv "uv==$(UV_VERSION)"

# Exactly the versions in uv.lock (fails if the lock is out of date with pyproject.toml).
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --all-extras --python $(PYTHON)
	touch $(STAMP)

.PHONY: setup bench test lock drift docs docs-build figures
setup: $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/vitprune bench

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# Re-resolve uv.lock after changing dependencies in pyproject.toml.
lock: | $(UV)
	$(UV) lock

# The newest releases of every dependency against the smoke tests (CI runs this too; .ci/drift names what it watches).
drift: | $(UV)
	bash .ci/drift

# The documentation site (MkDocs Material + mkdocstrings): serve locally, or build as CI does.
docs: $(STAMP)
	$(VENV)/bin/mkdocs serve

docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# Regenerate docs/figures from the shared assets (token pictures, the testbed's accuracy-vs-MACs plot).
figures: $(STAMP)
	$(VENV)/bin/python docs/figures.py
