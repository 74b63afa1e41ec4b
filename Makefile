# gatewayd developer targets. Every target creates the venv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-system run test test-floor lint bench clean

$(STAMP): pyproject.toml sim/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./sim
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) bench/run.py

test: $(STAMP)
	$(PY) -m pytest -q

# System files for a Pi (as root): unit, sysusers, tmpfiles, example config; see systemd/install.sh.
install-system:
	sh systemd/install.sh

# The suite again with every runtime dependency at its declared floor, in a second venv.
FLOOR_VENV ?= .venv-floor
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(PYTHON) .ci/floor.py > $(FLOOR_VENV)/floor-constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(FLOOR_VENV)/floor-constraints.txt -e '.[dev]' -e ./sim
	$(FLOOR_VENV)/bin/python -m pip check
	$(FLOOR_VENV)/bin/python -c 'import importlib.metadata as m, sys; from packaging.version import Version as V; \
	  pins = [l.split("==") for l in open(sys.argv[1]).read().split()]; \
	  bad = [(n, v, m.version(n)) for n, v in pins if V(m.version(n)) != V(v)]; \
	  sys.exit(f"not at the floor: {bad}" if bad else 0)' $(FLOOR_VENV)/floor-constraints.txt
	$(FLOOR_VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gatewayd drivers sim tests bench
	$(VENV)/bin/mypy gatewayd drivers sim/gatewayd_sim

bench: $(STAMP)
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache build *.egg-info sim/build sim/*.egg-info
