# The front door: `make run` runs the pipeline, `make test` runs the tests; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The AsyncAPI project's parser (npm), pinned by its lockfile, for the contract's test.
ASYNCAPI := tests/asyncapi/node_modules/.installed-stamp


.PHONY: run demo test lint bench bench-quick install services clean

# make run and make demo are development, said out loud: only there do the published development
# secrets (link key, API token) work. Without REPORTFLOW_ENV a process runs as in production.
run demo: export REPORTFLOW_ENV ?= development

$(STAMP): pyproject.toml constraints.txt
	infra/ensure-system-packages.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# The editable install maps the folders under reportflow with an import hook; setuptools' notice
	@# about it says nothing that applies here (no folder named reportflow), so it is not shown.
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -c constraints.txt -e '.[all,test,lint,bench]'
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
	infra/demo.sh $(BIN)

test: install $(ASYNCAPI)
	infra/ensure-test-services.sh
	$(BIN)/python -m pytest

# ruff (lint and format) and mypy on the project's own code. mypy reads the package by its import name,
# reportflow.*, through a tree of links to the repository's folders (the layout package-dir maps).
lint: install
	$(BIN)/ruff check --quiet .
	$(BIN)/ruff format --check --quiet .
	@mkdir -p build/typecheck/reportflow
	@for part in producers consumers shared schemas; do ln -sfn ../../../$$part build/typecheck/reportflow/$$part; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p reportflow

bench: install
	infra/ensure-test-services.sh
	$(BIN)/python -m bench.run

bench-quick: install
	infra/ensure-test-services.sh
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf var .pytest_cache
