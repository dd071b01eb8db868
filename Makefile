# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates the virtual environment .venv on first use (and again when
# pyproject.toml or the pins change), so both work on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit venv clean system-deps bench-gpu

demo: $(STAMP)
	$(BIN)/inversion-monitor demo

test: $(STAMP) system-deps lint typecheck unit

venv: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt torch==2.13.0 -e ".[dev]"
	touch $(STAMP)

# Debian's prometheus package provides promtool and prometheus for the tests;
# chromium renders the demo's HTML report in tests/test_demo.py; chromedriver
# (chromium-driver) lets selenium drive the live page in tests/test_page.py.
# postgresql-15 gives the PostgreSQL tests their throwaway clusters (tests/postgres_support.py).
system-deps:
	@(command -v promtool && command -v chromium && command -v chromedriver && test -x /usr/lib/postgresql/15/bin/initdb) >/dev/null 2>&1 || sh .ci/install-system-deps

lint: $(STAMP)
	$(BIN)/ruff check monitor callbacks server proto tests benchmarks
	$(BIN)/ruff format --check monitor callbacks server proto tests benchmarks

# mypy maps files to modules by folder, so type-check a link tree that has
# the import layout (inversion_monitor/ with its sub-packages inside).
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck/inversion_monitor
	cp -rs $(CURDIR)/monitor/. build/typecheck/inversion_monitor/
	for pkg in callbacks server proto; do cp -rs $(CURDIR)/$$pkg build/typecheck/inversion_monitor/$$pkg; done
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p inversion_monitor

unit: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every GPU section of every benchmark, one JSON of figures (build/bench-gpu.json);
# exits 2 without a CUDA device. See benchmarks/bench_gpu.py for a bare GPU machine.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py --out build/bench-gpu.json

clean:
	rm -rf $(VENV) build dist *.egg-info
