#!/usr/bin/env bash
# `make docker-test`: the compose bench's smoke test. Installs the engine and tools if missing,
# starts dockerd if it is not running (and stops it again at the end if it started it), builds
# the base image once (cached), builds the images, brings the bench up on free ports, waits for
# readings in all three simulators and one command result from each, checks that gatewayd stops
# gracefully on SIGTERM within Docker's 10 s, then `compose down`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
t_start=$SECONDS
source docker/engine.sh

ensure_tools
ensure_dockerd
project="gatewayd-smoke-$$"
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ] && [ -n "${up:-}" ]; then
    echo "--- compose logs (last 40 lines per service) ---"
    compose -p "$project" logs --no-color --tail=40 || true
  fi
  [ -n "${up:-}" ] && compose -p "$project" down -v --remove-orphans >/dev/null 2>&1 || true
  stop_dockerd
  exit $rc
}
trap cleanup EXIT

build_images

# free ports on 127.0.0.1 for every server (other engineers' tests run at the same time)
read -r BENCH_ENOS_PORT BENCH_ENOS_HTTP BENCH_OPSHUB_PORT BENCH_MMS_PORT BENCH_HEALTH_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
export BENCH_ENOS_PORT BENCH_ENOS_HTTP BENCH_OPSHUB_PORT BENCH_MMS_PORT BENCH_HEALTH_PORT
export GATEWAYD_BENCH_IMAGE=gatewayd:bench

up=1
compose -p "$project" up -d --quiet-pull 2>&1 | grep -v "^Creating\|^Starting" || true
compose -p "$project" ps
"$PY" docker/smoke.py --enos-http "$BENCH_ENOS_HTTP" --opshub "$BENCH_OPSHUB_PORT" \
  --mms "$BENCH_MMS_PORT" --health "$BENCH_HEALTH_PORT"

gw=$(compose -p "$project" ps -q gatewayd)
for _ in $(seq 1 60); do   # Docker's own health check (every 2 s on the bench): a failure bound
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$gw")" = healthy ] && break
  sleep 1
done
health=$(docker inspect -f '{{.State.Health.Status}}' "$gw")
echo "docker: gatewayd container health: $health"
[ "$health" = healthy ]

t0=$(date +%s.%N)
docker stop -t 10 "$gw" >/dev/null
t1=$(date +%s.%N)
code=$(docker inspect -f '{{.State.ExitCode}}' "$gw")
stop_s=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")
echo "docker: gatewayd stopped on SIGTERM in $stop_s s, exit code $code"
docker logs "$gw" 2>/dev/null | tail -n 3 | grep -q '"gateway_stopped"' \
  || { echo "docker: no JSON gateway_stopped line at the end of the log" >&2; exit 1; }
[ "$code" = 0 ]
awk "BEGIN{exit !($t1 - $t0 < 10)}"

compose -p "$project" down -v --remove-orphans >/dev/null 2>&1
up=
echo "docker-test: 1 passed, 0 failed ($(( SECONDS - t_start )) s)"
