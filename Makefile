# medledger — `make demo` and `make test` each do the whole set-up first (idempotent).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEMO_HOME ?= demo/testnet

.PHONY: setup demo demo-down test lint typecheck unit e2e fuzz bench bench-records bench-fhir bench-soak bench-all clean

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

# The fuzz tests of tests/adversarial/ with many more examples than `make test` runs
# (MEDLEDGER_FUZZ_EXAMPLES=N to choose; about 20 minutes at the default).
fuzz: setup
	MEDLEDGER_FUZZ_EXAMPLES=$${MEDLEDGER_FUZZ_EXAMPLES:-3000} $(VENV)/bin/pytest -q -s -p no:cacheprovider tests/adversarial/test_fuzz.py

bench: setup
	$(PY) bench/run.py

# Records end to end (put, put_many, reads) and the FHIR API (ingest, search), each beside the
# raw ledger rate of its own run: about 3 and 7 minutes. bench-fhir also measures HAPI FHIR JPA
# on PostgreSQL with the public Synthea Bundles (bench/hapi_server.py installs Java 17, Maven and
# PostgreSQL 15 when missing and builds bench/hapi once: minutes the first time). `make bench`
# stays the ledger benchmark.
bench-records: setup
	$(PY) bench/records.py

bench-fhir: setup
	$(PY) bench/fhir.py

# A year of records: 1,000,000 records on a 4-validator network (hours on this machine; not part
# of bench-all). SOAK_RECORDS=N for a shorter soak.
bench-soak: setup
	$(PY) bench/soak.py --records $${SOAK_RECORDS:-1000000}

bench-all: bench bench-records bench-fhir

clean:
	rm -rf .venv .tools .gen demo
