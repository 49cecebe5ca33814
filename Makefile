# The two commands that matter: `make cluster-up` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEPLOYCTL := $(VENV)/bin/deployctl
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
	PY=$(PY) scripts/bootstrap.sh

# The engine this run starts (if none answered) is stopped at the end; one that was running
# before (say, make cluster-up's) stays: scripts/engine.sh stops only its ENGINE_OWNER's.
test: venv
	@owner=make-test-$$$$-$$(date +%s%N); export ENGINE_OWNER=$$owner; \
	trap '[ "$${TESTBED_KEEP_ENGINE:-}" = 1 ] || scripts/engine.sh stop' EXIT; \
	PY=$(PY) scripts/bootstrap.sh && $(VENV)/bin/pytest

test-unit: venv
	$(VENV)/bin/pytest tests/unit

lint: venv
	$(VENV)/bin/ruff check scheduler deploy tests bench
	$(VENV)/bin/mypy scheduler deploy
	$(VENV)/bin/lint-imports

# The scheduler against the classic design and multiprocessing.Pool, then deployctl's timings
# on the 3-host test bed. QUICK=1 for a short scheduler run.
bench: deps
	$(PY) -m bench.run $(if $(QUICK),--quick)
	$(PY) -m bench.hops
	$(PY) -m bench.faults
	$(PY) -m bench.observe
	$(PY) -m bench.tls $(if $(QUICK),--quick)
	$(PY) -m bench.retention
	$(PY) -m bench.chain
	$(PY) -m bench.arrays $(if $(QUICK),--quick)
	$(PY) -m bench.deployctl

# ---- images and test bed (owned by the images/test-bed work) ----
# Role images scheduler-master/-slave, tagged VERSION, hash-<inputs> and latest; skipped when
# up to date. BASE=image overrides the base (default python:3.11-slim, else the offline one).
images: deps
	$(DEPLOYCTL) build $(if $(BASE),--base $(BASE))

# The offline base (debootstrap bookworm + python3) as scheduler-base:bookworm; FORCE=1 rebuilds.
base-image: deps
	$(DEPLOYCTL) base-image $(if $(FORCE),--force)

# TESTBED_HOSTS namespaced hosts with their own dockerd and sshd (LOOPBACK=1: 127.0.0.x hosts).
TESTBED_HOSTS ?= 3
testbed-up: deps
	$(PY) -m tests.testbed up --hosts $(TESTBED_HOSTS) $(if $(LOOPBACK),--loopback)

testbed-down: venv
	$(PY) -m tests.testbed down
	$(PY) -m tests.testbed down --loopback

# ---- cluster (owned by the deployctl work) ----
# No HOSTS and no cluster.toml: the whole cluster on this machine's engine ("localhost").
CLUSTER := $(if $(HOSTS),--hosts "$(HOSTS)",$(if $(wildcard cluster.toml),,--hosts localhost))

cluster-up: deps
	$(DEPLOYCTL) up $(CLUSTER)
	@echo "demo batch: deploy/demo.jobs (progress in 'make logs')" >&2
	$(DEPLOYCTL) submit --wait --file deploy/demo.jobs $(CLUSTER)
	$(DEPLOYCTL) logs master --tail 12 $(CLUSTER)

cluster-down: venv
	$(DEPLOYCTL) down $(CLUSTER)

scale: venv
	$(DEPLOYCTL) scale workers $(N) $(CLUSTER)

logs: venv
	$(DEPLOYCTL) logs --tail 50 $(CLUSTER)

status: venv
	$(DEPLOYCTL) status $(CLUSTER)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
