#!/usr/bin/env bash
# Stops what `make up` started (by recorded pid), then unmounts and detaches this node's
# datasets, leaving nothing mounted or attached. Keeps the state: certificates and datasets
# come back with the next `make up`.
set -euo pipefail
state=${1:?usage: down.sh STATE_DIR}
cd "$(dirname "$0")/../.."
bin=$PWD/.venv/bin
stop() {  # name pidfile
  local pidfile=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "down: stopped $1 (pid $pid)"
  fi
  rm -f "$pidfile"
}
if [ -f "$state/dockerd.pid" ] && kill -0 "$(cat "$state/dockerd.pid")" 2>/dev/null; then
  # Containers first: they hold pyflock volumes mounted.
  ids=$(docker ps -q 2>/dev/null || true)
  [ -z "$ids" ] || docker rm -f $ids >/dev/null
fi
stop dockerd "$state/dockerd.pid"
stop agent "$state/agent.pid"
if [ -f "$state/node/agent.yml" ]; then
  "$bin/pyflock-agent" release --config "$state/node/agent.yml" \
    && echo "down: unmounted and detached this node's datasets (kept for the next make up)"
fi
stop "control service" "$state/control.pid"
