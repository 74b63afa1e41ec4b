# gatewayd in a container. Two images from one file:
#   docker build -t gatewayd .                      # the daemon only (what a site runs)
#   docker build --target bench -t gatewayd:bench . # plus gatewayd-sim: simulators, emulated chips
# The wheels are built on the host first (`make docker-wheels` puts the daemon's, the simulators'
# and every dependency's wheel in build/wheelhouse); the images install them with --no-index, so a
# build needs no network: the air-gapped site case. BASE defaults to the official slim image; the
# tests here pass a base made with debootstrap (docker/base-image.sh).
ARG BASE=python:3.11-slim-bookworm

# --- build: the venv, installed offline from the wheelhouse --------------------------------------
FROM ${BASE} AS build
COPY build/wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/gatewayd && /opt/gatewayd/bin/pip install --no-index --find-links /wheelhouse \
      --no-cache-dir -q gatewayd
# the bench venv: the same plus gatewayd-sim, then both drop pip (no installer in a runtime image)
FROM build AS build-bench
RUN /opt/gatewayd/bin/pip install --no-index --find-links /wheelhouse --no-cache-dir -q \
      gatewayd-sim \
 && /opt/gatewayd/bin/pip uninstall -q -y pip setuptools && find /opt/gatewayd -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/gatewayd/bin/python -m compileall -q -j 0 /opt/gatewayd/lib >/dev/null
FROM build AS build-daemon
RUN /opt/gatewayd/bin/pip uninstall -q -y pip setuptools && find /opt/gatewayd -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/gatewayd/bin/python -m compileall -q -j 0 /opt/gatewayd/lib >/dev/null

# --- common runtime settings ---------------------------------------------------------------------
FROM ${BASE} AS runtime
# A fixed uid/gid so a bind-mounted state directory can be chowned on the host (`chown 10001`).
# The supplementary groups for /dev/ttyUSB0 (dialout) and /dev/i2c-1 (i2c) come from the host at
# run time (`group_add:` in compose, `--group-add` with docker run): their ids differ per host.
RUN groupadd --system --gid 10001 gatewayd \
 && useradd --system --uid 10001 --gid gatewayd --home-dir /var/lib/gatewayd --no-create-home \
      --shell /usr/sbin/nologin gatewayd \
 && install -d -o gatewayd -g gatewayd -m 0750 /var/lib/gatewayd \
 && install -d -m 0755 /etc/gatewayd
ENV PATH=/opt/gatewayd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAYD_CONFIG=/etc/gatewayd/gatewayd.toml \
    GATEWAYD_HEALTH_URL=http://127.0.0.1:9847/healthz
# The queue (queue.db) and every other state file live here: keep it on a volume.
VOLUME ["/var/lib/gatewayd"]
WORKDIR /var/lib/gatewayd
USER gatewayd
# SIGTERM: stop sampling, commit, let uplinks flush for [gateway] stop_timeout, exit 0. Keep
# stop_timeout below Docker's 10 s grace (or raise `stop_grace_period`/`docker stop -t`).
STOPSIGNAL SIGTERM
# /healthz answers 200 while the daemon is healthy (config [health] listen; the URL is an env var
# so a config on another port only sets GATEWAYD_HEALTH_URL). No curl in the image: Python's own.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen(os.environ['GATEWAYD_HEALTH_URL'], timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gatewayd"]
# The config is mounted read-only at /etc/gatewayd/gatewayd.toml. Logs: JSON lines on stdout
# ([log] format "auto" picks JSON when stdout is not a terminal).
CMD ["run"]

# --- bench: the daemon plus gatewayd-sim (simulators, emulated I2C chips and serial devices) ------
FROM runtime AS bench
COPY --from=build-bench /opt/gatewayd /opt/gatewayd
LABEL org.opencontainers.image.title="gatewayd bench" \
      org.opencontainers.image.description="gatewayd with the gatewayd-sim bench tools"

# --- the daemon alone (default target) -----------------------------------------------------------
FROM runtime AS gatewayd
COPY --from=build-daemon /opt/gatewayd /opt/gatewayd
LABEL org.opencontainers.image.title="gatewayd" \
      org.opencontainers.image.description="Edge gateway daemon: sensors to a durable queue to the clouds"
