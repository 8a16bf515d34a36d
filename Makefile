# `make test` and `make demo` create .venv on first use; both are safe to re-run.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test lint demo clean

DEMO_ARGS ?=

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

lint: install
	$(PY) -m ruff check training index service tests benchmarks

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
