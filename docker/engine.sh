# Sourced by docker/test.sh and `make docker-run`: the Docker engine and tools from Debian.
#   ensure_tools     installs docker.io, docker-compose and debootstrap if missing (as root)
#   ensure_dockerd   starts dockerd if it does not answer; sets GATEWAYD_STARTED_DOCKERD=1 then
#   stop_dockerd     stops it again, only if ensure_dockerd started it
#   compose ...      docker-compose (Debian's 1.29) or, failing that, `docker compose`

ensure_tools() {
  local need=()
  command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
    || need+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    echo "docker: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

GATEWAYD_STARTED_DOCKERD=0
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/gatewayd-dockerd.log}

ensure_dockerd() {
  if docker info >/dev/null 2>&1; then
    return 0
  fi
  echo "docker: starting dockerd (log: $DOCKERD_LOG)"
  dockerd >"$DOCKERD_LOG" 2>&1 &
  GATEWAYD_DOCKERD_PID=$!
  GATEWAYD_STARTED_DOCKERD=1
  local i
  for i in $(seq 1 120); do   # up to 60 s: a failure bound, it answers in about a second
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$GATEWAYD_DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  echo "docker: dockerd did not come up:" >&2
  tail -n 20 "$DOCKERD_LOG" >&2
  return 1
}

stop_dockerd() {
  if [ "$GATEWAYD_STARTED_DOCKERD" = 1 ] && kill -0 "$GATEWAYD_DOCKERD_PID" 2>/dev/null; then
    echo "docker: stopping the dockerd this run started"
    kill -TERM "$GATEWAYD_DOCKERD_PID"
    wait "$GATEWAYD_DOCKERD_PID" 2>/dev/null || true
  fi
}

compose() {
  if command -v docker-compose >/dev/null 2>&1; then
    docker-compose "$@"
  else
    docker compose "$@"
  fi
}

# Build gatewayd:latest and gatewayd:bench from build/wheelhouse on $BASE (default: the local
# debootstrap base, built once and cached; BASE=python:3.11-slim-bookworm where a registry is
# reachable).
build_images() {
  local base=${BASE:-local/bookworm-python:3.11}
  if [ "$base" = local/bookworm-python:3.11 ]; then
    BASE_IMAGE=$base "$(dirname "${BASH_SOURCE[0]}")/base-image.sh"
  fi
  local t0=$SECONDS
  docker build -q --build-arg BASE="$base" --target bench -t gatewayd:bench . >/dev/null 2>"$BUILD_LOG" \
    || { cat "$BUILD_LOG" >&2; return 1; }
  docker build -q --build-arg BASE="$base" -t gatewayd:latest . >/dev/null 2>>"$BUILD_LOG" \
    || { cat "$BUILD_LOG" >&2; return 1; }
  local s
  for s in gatewayd:latest gatewayd:bench "$base"; do
    printf 'docker: image %-28s %6.1f MB\n' "$s" "$(docker image inspect -f '{{.Size}}' "$s" | awk '{print $1/1e6}')"
  done
  echo "docker: images built in $(( SECONDS - t0 )) s on base $base"
}
BUILD_LOG=${BUILD_LOG:-/tmp/gatewayd-docker-build.log}
