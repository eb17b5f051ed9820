#!/usr/bin/env bash
# The etcd cluster of `make up HA=1`: three etcd members on 127.0.0.1, their data on disk
# under STATE/etcd/mN, pids in STATE/etcd-mN.pid, logs in STATE/logs/etcd-mN.log.
#   etcd.sh up STATE     start the members that do not run, wait until the cluster has a leader,
#                        print the client URLs (comma-separated) on stdout
#   etcd.sh down STATE   stop every member (SIGTERM, then SIGKILL)
# Client ports are PYFLOCK_ETCD_PORT (default 23790), +2, +4; peer ports one above each.
# etcd's stock flags but for names and URLs: the v3 JSON gateway is on (docs/ha.md).
set -euo pipefail
action=${1:?usage: etcd.sh up|down STATE}
state=${2:?usage: etcd.sh up|down STATE}
base=${PYFLOCK_ETCD_PORT:-23790}
members="m0 m1 m2"
client_port() { echo $((base + 2 * ${1#m})); }
peer_port() { echo $((base + 2 * ${1#m} + 1)); }
alive() {  # pidfile
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$(cat "$1")/cmdline" 2>/dev/null | grep -q etcd
}

if [ "$action" = down ]; then
  for m in $members; do
    pidfile=$state/etcd-$m.pid
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      echo "down: stopped etcd member $m (pid $pid)" >&2
    fi
    rm -f "$pidfile"
  done
  exit 0
fi

command -v etcd >/dev/null || { echo "up: etcd is not installed (apt-get install etcd-server)" >&2; exit 1; }
mkdir -p "$state/etcd" "$state/logs"
initial=""
for m in $members; do initial="$initial${initial:+,}$m=http://127.0.0.1:$(peer_port "$m")"; done
urls=""
for m in $members; do
  url=http://127.0.0.1:$(client_port "$m")
  urls="$urls${urls:+,}$url"
  if alive "$state/etcd-$m.pid"; then continue; fi
  # A member whose data folder exists joins with it (state "existing" is ignored then).
  nohup etcd --name "$m" --data-dir "$state/etcd/$m" \
    --listen-client-urls "$url" --advertise-client-urls "$url" \
    --listen-peer-urls "http://127.0.0.1:$(peer_port "$m")" \
    --initial-advertise-peer-urls "http://127.0.0.1:$(peer_port "$m")" \
    --initial-cluster "$initial" --initial-cluster-token pyflock-make-up \
    --initial-cluster-state new \
    --auto-compaction-mode periodic --auto-compaction-retention 1h \
    >>"$state/logs/etcd-$m.log" 2>&1 </dev/null &
  echo $! >"$state/etcd-$m.pid"
done
for _ in $(seq 150); do
  leader=$(curl -s -m 1 -X POST "http://127.0.0.1:$(client_port m0)/v3/maintenance/status" \
    -d '{}' 2>/dev/null | grep -o '"leader":"[0-9]*"' || true)
  if [ -n "$leader" ]; then echo "$urls"; exit 0; fi
  for m in $members; do
    if ! alive "$state/etcd-$m.pid"; then
      echo "up: etcd member $m exited; last lines of $state/logs/etcd-$m.log:" >&2
      tail -n 5 "$state/logs/etcd-$m.log" >&2; exit 1
    fi
  done
  sleep 0.2
done
echo "up: the etcd cluster has no leader after 30 s; see $state/logs/etcd-m*.log" >&2
exit 1
