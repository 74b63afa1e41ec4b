# gatewayd developer targets. Every target creates the venv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-system run test test-floor lint bench fleet soak clean docker-wheels docker-run docker-down docker-test dist

$(STAMP): pyproject.toml sim/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./sim
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) bench/run.py

# The suite runs on the event loop the daemon picks (uvloop where it is installed); the part
# that drives the loop in-process (drivers, queue, sampler, engine, HTTP, the uplink contract)
# runs again on asyncio's own loop, the daemon's fallback (gatewayd/loop.py).
ASYNCIO_TESTS := tests/drivers tests/contract tests/test_queue.py tests/test_storage.py \
	tests/test_sampler.py tests/test_engine.py tests/test_worker.py tests/test_httpd.py \
	tests/test_health.py tests/test_service.py tests/test_live_first.py tests/test_jsonl.py \
	tests/test_dispatch.py tests/test_loop.py

test: $(STAMP)
	$(PY) -m pytest -q
	GATEWAYD_TEST_LOOP=asyncio $(PY) -m pytest -q -p no:cacheprovider $(ASYNCIO_TESTS)

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
	$(VENV)/bin/ruff check gatewayd drivers sim tests bench docker
	$(VENV)/bin/mypy gatewayd drivers sim/gatewayd_sim

# N gateways against one simulator set (README "Fleet bench"); under the bench lock
fleet: $(STAMP)
	flock /tmp/gatewayd-bench.lock $(PY) bench/fleet/fleet.py $(FLEET_ARGS)

# sdist and wheel of both distributions in dist/ (offline: the build backend is the venv's)
dist: $(STAMP)
	rm -rf dist build/lib build/bdist.* sim/build
	$(PY) -m build -q --no-isolation --outdir dist . >build/dist.log 2>&1 || { cat build/dist.log; false; }
	$(PY) -m build -q --no-isolation --outdir dist sim >>build/dist.log 2>&1 || { cat build/dist.log; false; }
	@ls -l dist

# --- Docker (README "Docker"): wheels built here, installed offline in the images -------------
docker-wheels: $(STAMP)
	rm -rf build/wheelhouse build/lib build/bdist.* sim/build && mkdir -p build
	$(PY) -m pip wheel -q -w build/wheelhouse . ./sim >build/wheels.log 2>&1 || { cat build/wheels.log; false; }

docker-run: docker-wheels
	bash -c 'set -e; source docker/engine.sh; ensure_tools; ensure_dockerd; build_images; \
	  compose up -d; compose ps; \
	  $(PY) docker/smoke.py --enos-http 18080 --opshub 8790 --mms 8443 --health 9847; \
	  echo; echo "bench is up (host network, 127.0.0.1):"; \
	  echo "  docker-compose logs -f gatewayd                      # the daemon, JSON lines"; \
	  echo "  curl -s 127.0.0.1:9847/status | python3 -m json.tool  # devices, uplinks, backlog"; \
	  echo "  curl -s 127.0.0.1:18080/points?limit=5                # what the EnOS hub accepted"; \
	  echo "  curl -s 127.0.0.1:8790/sim/data?limit=5               # what Operations Hub stored"; \
	  echo "  curl -s 127.0.0.1:8443/sim/rows/m0t0y0p0e1            # what HCP IoT MMS stored"; \
	  echo "  make docker-down                                      # stop it"'

docker-down:
	bash -c 'source docker/engine.sh; compose down'

docker-test: docker-wheels
	PY=$(PY) docker/test.sh

bench: $(STAMP)
	$(PY) bench/bench.py

# The long fault campaign (root: tmpfs and FUSE): SIGKILLs, ENOSPC, 50 power cuts per fsync policy.
soak: $(STAMP)
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .pytest_cache build dist *.egg-info sim/build sim/*.egg-info
