# The front door: `make run` runs the pipeline, `make test` runs the tests; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The AsyncAPI project's parser (npm), pinned by its lockfile, for the contract's test.
ASYNCAPI := tests/asyncapi/node_modules/.installed-stamp


.PHONY: run demo test bench bench-quick install services clean

# make run and make demo are development, said out loud: only there do the published development
# secrets (link key, API token) work. Without REPORTFLOW_ENV a process runs as in production.
run demo: export REPORTFLOW_ENV ?= development

$(STAMP): pyproject.toml constraints.txt
	infra/ensure-system-packages.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench]'
	$(BIN)/pip check
	touch $@

$(ASYNCAPI): tests/asyncapi/package.json tests/asyncapi/package-lock.json
	cd tests/asyncapi && npm ci --no-audit --no-fund --silent
	touch $@

install: $(STAMP)

services:
	infra/ensure-rabbitmq.sh

run: install services
	$(BIN)/reportflow db upgrade
	$(BIN)/reportflow topology declare
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile

demo: install services
	$(BIN)/reportflow demo

test: install $(ASYNCAPI)
	infra/ensure-test-services.sh
	$(BIN)/python -m pytest

bench: install
	infra/ensure-test-services.sh
	$(BIN)/python -m bench.run

bench-quick: install
	infra/ensure-test-services.sh
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf var .pytest_cache
