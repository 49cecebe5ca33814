# The two commands that matter: `make cluster-up` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOSTS ?=
N ?= 5

.PHONY: help venv deps test test-unit bench lint images base-image cluster-up cluster-down scale logs status testbed-up testbed-down clean

help:
	@echo "make cluster-up [HOSTS='h1 h2']  start a cluster (this machine's engine when HOSTS is empty) and run a demo batch"
	@echo "make test                        install what is missing and run the whole suite"
	@echo "make bench                       print the benchmark table"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[deploy,dev]'
	touch $@

venv: $(VENV)/.installed

# System packages and services (Docker engine, sshd tools); idempotent, quick when done.
deps: venv
	scripts/bootstrap.sh

test: deps
	$(VENV)/bin/pytest

test-unit: venv
	$(VENV)/bin/pytest tests/unit

lint: venv
	$(VENV)/bin/ruff check scheduler deploy tests bench
	$(VENV)/bin/mypy scheduler deploy

bench: venv
	$(PY) -m bench.run

# ---- images and test bed (owned by the images/test-bed work) ----
images: deps
	@echo "images: not yet"

base-image: deps
	@echo "base-image: not yet"

testbed-up: deps
	@echo "testbed-up: not yet"

testbed-down:
	@echo "testbed-down: not yet"

# ---- cluster (owned by the deployctl work) ----
cluster-up: deps
	@echo "cluster-up: not yet"

cluster-down: venv
	@echo "cluster-down: not yet"

scale: venv
	@echo "scale: not yet"

logs: venv
	@echo "logs: not yet"

status: venv
	@echo "status: not yet"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
