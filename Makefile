# gatewayd developer targets. Every target creates the venv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check gatewayd drivers sim tests bench
	$(VENV)/bin/mypy gatewayd drivers sim/gatewayd_sim

bench: $(STAMP)
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info sim/build sim/*.egg-info
