#!/usr/bin/env bash
# Stops what `make up` started (by recorded pid); keeps the state (certificates, datasets).
set -euo pipefail
state=${1:?usage: down.sh STATE_DIR}
stop() {  # name pidfile
  local pidfile=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "down: stopped $1 (pid $pid)"
  fi
  rm -f "$pidfile"
}
stop "control service" "$state/control.pid"
