# medledger — `make demo` and `make test` each do the whole set-up first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEMO_HOME ?= demo/testnet

.PHONY: setup demo demo-down test lint typecheck unit e2e bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m medledger.cli.demo --home $(DEMO_HOME)

demo-down: setup
	@$(PY) -m medledger.cli.main testnet down --home $(DEMO_HOME)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -m "not e2e" -q

e2e: setup
	$(VENV)/bin/pytest -m e2e -q

test: setup lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf .venv .tools .gen demo
