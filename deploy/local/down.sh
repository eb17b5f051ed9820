#!/usr/bin/env bash
# Stops what `make up` (or `make up HA=1`) started (by recorded pid), then unmounts and detaches this node's
# datasets, leaving nothing mounted or attached. Keeps the state: certificates and datasets
# come back with the next `make up`.
set -euo pipefail
state=${1:?usage: down.sh STATE_DIR}
cd "$(dirname "$0")/../.."
venv=${PYFLOCK_VENV:-.venv}
bin=$(cd "$venv" && pwd)/bin
stop() {  # name pidfile program
  local pidfile=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  # Only while the pid is still that program: pids are reused after a reboot.
  if kill -0 "$pid" 2>/dev/null &&
     tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$3"; then
    kill "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "down: stopped $1 (pid $pid)"
  fi
  rm -f "$pidfile"
}
# Containers using pyflock volumes first, whoever runs dockerd: they hold the volumes
# mounted. Other containers are left alone (unless dockerd itself stops below).
if docker info >/dev/null 2>&1; then
  for volume in $(docker volume ls -q --filter driver=pyflock); do
    ids=$(docker ps -q --filter "volume=$volume")
    if [ -n "$ids" ]; then
      docker stop $ids >/dev/null
      echo "down: stopped the containers using volume $volume"
    fi
  done
fi
stop dockerd "$state/dockerd.pid" dockerd
stop agent "$state/agent.pid" pyflock-agent
if [ -f "$state/node/agent.yml" ]; then
  if "$bin/pyflock-agent" release --config "$state/node/agent.yml"; then
    echo "down: unmounted and detached this node's datasets (kept for the next make up)"
  else
    echo "down: some datasets could not be released (above); they stay mounted" >&2
    status=1
  fi
fi
stop "control service" "$state/control.pid" pyflock-control
# make up HA=1: the replicas, then the etcd members under them.
stop "control replica 1" "$state/control-1.pid" pyflock-control
stop "control replica 2" "$state/control-2.pid" pyflock-control
deploy/local/etcd.sh down "$state"
exit "${status:-0}"
