# pyflock: `make up` runs it on this machine, `make test` runs the whole suite.
# Both install what they need first (apt-get packages, a virtualenv in .venv).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STATE  ?= $(CURDIR)/.state
PYTEST_ARGS ?=

.PHONY: install up down test test-unit bench lint clean

install:
	@deploy/local/install.sh $(VENV)

# HA=1: three etcd members and two control replicas instead of one SQLite control service.
HA ?=

up: install
	@PYFLOCK_VENV=$(VENV) PYFLOCK_HA=$(HA) deploy/local/up.sh $(STATE)

down:
	@PYFLOCK_VENV=$(VENV) deploy/local/down.sh $(STATE)

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: install
	$(VENV)/bin/pytest -m "not integration and not e2e" $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py --output docs/benchmarks.md

lint: install
	$(VENV)/bin/python -m pyflakes common control agent cli tests bench

clean: down
	rm -rf $(VENV) *.egg-info
