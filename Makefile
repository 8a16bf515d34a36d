# `make test` and `make demo` create .venv on first use; both are safe to re-run.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,dev,train,serve,ray
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test lint demo bench clean

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

# One pytest process per part, and the Ray tests in one of their own: after ray.shutdown() the driver keeps
# native threads that crashed later tests with SIGSEGV, and long single-process runs (torch, OpenVINO and
# ONNX Runtime threads in one process) segfaulted now and then; no per-part run has (see DEVELOPERS.md).
test: install
	$(PY) -m pytest -q -m "not ray" tests/training tests/test_architecture.py
	$(PY) -m pytest -q -m "not ray" tests/index
	$(PY) -m pytest -q -m "not ray" tests/service tests/browser
	$(PY) -m pytest -q tests/deploy
	$(PY) -m pytest -q -m ray

demo: install
	$(PY) scripts/demo.py $(DEMO_ARGS)

# Each benchmark prints its figures and writes JSON to benchmarks/results/ (minutes on 2 CPU cores).
bench: install
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_features.py
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_quality.py
	$(PY) benchmarks/bench_runtimes.py
	$(PY) benchmarks/bench_service.py
	$(PY) benchmarks/bench_shop.py

clean:
	rm -rf $(VENV) .pytest_cache
