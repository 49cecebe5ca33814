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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
