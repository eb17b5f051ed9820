#!/usr/bin/env bash
# Brings up pyflock on this machine: a cluster CA and certificates under the state folder,
# and the control service in the background with the embedded store. Idempotent.
set -euo pipefail
state=${1:?usage: up.sh STATE_DIR}
cd "$(dirname "$0")/../.."
bin=$PWD/.venv/bin
certs=$state/certs
port=${PYFLOCK_PORT:-4523}
agent_port=${PYFLOCK_AGENT_PORT:-4524}
mkdir -p "$state/logs" "$certs"
chmod 700 "$state" "$certs"

if [ ! -f "$certs/cluster.crt" ]; then
  (cd "$certs"
   "$bin/pyflock-ca" initialize local >/dev/null
   "$bin/pyflock-ca" create-control-certificate 127.0.0.1 >/dev/null
   mv control-127.0.0.1.crt control-service.crt
   mv control-127.0.0.1.key control-service.key
   "$bin/pyflock-ca" create-api-certificate admin >/dev/null)
  echo "up: created a cluster CA and certificates in $certs"
fi

pidfile=$state/control.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "up: control service already running (pid $(cat "$pidfile"))"
else
  nohup "$bin/pyflock-control" run --data-path "$state/control" \
    --port "tcp:$port:interface=127.0.0.1" --agent-port "tcp:$agent_port:interface=127.0.0.1" \
    --certificates-directory "$certs" >>"$state/logs/control.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
fi

config_home=${XDG_CONFIG_HOME:-$HOME/.config}/pyflock
mkdir -p "$config_home"
cat >"$config_home/cli.yml" <<YML
# Written by pyflock's make up.
control-service: 127.0.0.1
control-port: $port
certs-path: $certs
user: admin
YML

for _ in $(seq 100); do
  if "$bin/pyflock" version >/dev/null 2>&1; then
    echo "up: control service answering on https://127.0.0.1:$port (log: $state/logs/control.log)"
    echo "up: the CLI is configured in $config_home/cli.yml; try:"
    echo "      $bin/pyflock list-nodes"
    echo "      $bin/pyflock create --node <node-uuid> --size 1G --name demo"
    echo "      $bin/pyflock list"
    exit 0
  fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "up: the control service exited; last lines of $state/logs/control.log:" >&2
    tail -n 5 "$state/logs/control.log" >&2; rm -f "$pidfile"; exit 1
  fi
  sleep 0.2
done
echo "up: the control service did not answer within 20 s; see $state/logs/control.log" >&2
exit 1
