#!/usr/bin/env bash
# Brings up pyflock on this machine: a cluster CA and certificates under the state folder,
# the control service (embedded store), a local agent (loopback backend) serving the Docker
# plugin, dockerd if none is running, and proves it all with a real `docker run -v`.
# Idempotent: what already runs is left alone.
set -euo pipefail
state=${1:?usage: up.sh STATE_DIR}
cd "$(dirname "$0")/../.."
venv=${PYFLOCK_VENV:-.venv}
bin=$(cd "$venv" && pwd)/bin
ca=$state/ca        # the cluster CA: cluster.key and its index, for pyflock-ca and joins only
certs=$state/certs  # the control service's certificates folder (no CA key)
cli=$state/cli      # the CLI's: cluster.crt and the admin user's certificate and key
node=$state/node
port=${PYFLOCK_PORT:-4523}
agent_port=${PYFLOCK_AGENT_PORT:-4524}
join_port=${PYFLOCK_JOIN_PORT:-4526}
mkdir -p "$state/logs"
chmod 700 "$state"
say() { echo "up: $*"; }

# A recorded pid counts only while it is still that program (pids are reused after a reboot).
running() {  # pidfile [program]
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  [ -z "${2:-}" ] || tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

wait_until() {  # what pidfile log command...
  local what=$1 pidfile=$2 log=$3; shift 3
  for _ in $(seq 150); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ -n "$pidfile" ] && ! running "$pidfile"; then
      echo "up: $what exited; last lines of $log:" >&2; tail -n 5 "$log" >&2
      rm -f "$pidfile"; exit 1
    fi
    sleep 0.2
  done
  echo "up: $what did not come up within 30 s; see $log" >&2; exit 1
}

# -- certificates: each key in the folder of whoever uses it (docs/security.md) -----------
deploy/local/certificates.sh "$state" "$bin"

# -- control service: one on SQLite, or with HA=1 two replicas on three etcd members -----
ha=${PYFLOCK_HA:-}
control_hosts=127.0.0.1   # where agents and the CLI reach the control service
start_control() {  # name pidfile host ports-suffix extra arguments...
  local name=$1 pidfile=$2 host=$3 api=$4 agent=$5 join=$6; shift 6
  if running "$pidfile" pyflock-control; then
    say "$name already running (pid $(cat "$pidfile"))"; return
  fi
  nohup "$bin/pyflock-control" run \
    --port "tcp:$api:interface=$host" --agent-port "tcp:$agent:interface=$host" \
    --join-port "tcp:$join:interface=$host" --ca-key "$ca/cluster.key" "$@" \
    >>"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  disown $!  # killing one below must not make bash report it
}
if [ -n "$ha" ]; then
  if running "$state/control.pid" pyflock-control; then
    echo "up: a control service on SQLite runs (make up without HA=1); make down first" >&2; exit 1
  fi
  endpoints=$(deploy/local/etcd.sh up "$state")
  say "etcd: three members at $endpoints (data in $state/etcd)"
  # Both replicas are reached on one port at two loopback addresses, as agents expect
  # (one port, a list of hosts), with one control certificate naming both.
  hacerts=$state/ha-certs
  mkdir -p "$hacerts" && chmod 700 "$hacerts"
  if [ ! -f "$hacerts/control-service.crt" ]; then
    "$bin/pyflock-ca" create-control-certificate -i "$ca" -o "$hacerts" 127.0.0.1 127.0.0.2 \
      >/dev/null
    mv "$hacerts/control-127.0.0.1.crt" "$hacerts/control-service.crt"
    mv "$hacerts/control-127.0.0.1.key" "$hacerts/control-service.key"
  fi
  cp "$ca/cluster.crt" "$hacerts/cluster.crt"
  control_hosts="127.0.0.1 127.0.0.2"
  replica2=(127.0.0.2 "$port" "$agent_port" "$join_port")
  store=(--store etcd --etcd-endpoints "$endpoints" --certificates-directory "$hacerts")
  start_control control-1 "$state/control-1.pid" 127.0.0.1 "$port" "$agent_port" \
    "$join_port" "${store[@]}" --replica-name replica-1
  start_control control-2 "$state/control-2.pid" "${replica2[@]}" "${store[@]}" \
    --replica-name replica-2
else
  if running "$state/control-1.pid" pyflock-control; then
    echo "up: the HA control service runs (make up HA=1); make down first" >&2; exit 1
  fi
  start_control control "$state/control.pid" 127.0.0.1 "$port" "$agent_port" "$join_port" \
    --data-path "$state/control" --certificates-directory "$certs"
fi
config_home=${XDG_CONFIG_HOME:-$HOME/.config}/pyflock
mkdir -p "$config_home"
cat >"$config_home/cli.yml" <<YML
# Written by pyflock's make up.
control-service: $(echo "$control_hosts" | tr ' ' ',')
control-port: $port
certs-path: $cli
user: admin
YML
if [ -n "$ha" ]; then
  wait_until "replica 1" "$state/control-1.pid" "$state/logs/control-1.log" \
    "$bin/pyflock" --control-service 127.0.0.1 version
  wait_until "replica 2" "$state/control-2.pid" "$state/logs/control-2.log" \
    "$bin/pyflock" --control-service "${replica2[0]}" --control-port "${replica2[1]}" version
  say "control replicas answering on https://127.0.0.1:$port and https://${replica2[0]}:${replica2[1]}"
else
  wait_until "the control service" "$state/control.pid" "$state/logs/control.log" \
    "$bin/pyflock" version
  say "control service answering on https://127.0.0.1:$port"
fi

hostnames() {  # "a" as a string, "a b" as a YAML list
  case $1 in *" "*) echo "[${1// /, }]" ;; *) echo "$1" ;; esac
}
# -- agent and its Docker plugin (before dockerd, which then finds the plugin at once) ----
cat >"$node/agent.yml" <<YML
# Written by pyflock's make up.
version: 1
control-service: {hostname: $(hostnames "$control_hosts"), port: $agent_port, api-port: $port}
certificates: $node/certs
data-path: $node/data
node: {address: 127.0.0.1}
dataset: {backend: loopback, root_path: $state/loopback, default_size: 10G}
plugin: {socket: /run/docker/plugins/pyflock.sock, docker: /run/docker.sock}
YML
if running "$state/agent.pid" pyflock-agent; then
  say "agent already running (pid $(cat "$state/agent.pid"))"
else
  nohup "$bin/pyflock-agent" run --config "$node/agent.yml" \
    >>"$state/logs/agent.log" 2>&1 </dev/null &
  echo $! >"$state/agent.pid"
fi
wait_until "the agent" "$state/agent.pid" "$state/logs/agent.log" \
  test -S /run/docker/plugins/pyflock.sock
registered() {  # the agent is alive for some replica (each knows the agents it serves
  # until replicas share agents' reports)
  local host
  for host in $control_hosts; do
    "$bin/pyflock" --control-service "$host" list-nodes --json 2>/dev/null |
      grep -q '"alive": true' && return 0
  done
  return 1
}
wait_until "the agent's registration" "" "$state/logs/agent.log" registered
say "agent running; Docker plugin at /run/docker/plugins/pyflock.sock"

# -- dockerd ------------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
  say "using the running dockerd"
elif command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl start docker
  wait_until "dockerd" "" /dev/null docker info
  say "started dockerd (systemd)"
else
  nohup dockerd >>"$state/logs/dockerd.log" 2>&1 </dev/null &
  echo $! >"$state/dockerd.pid"
  wait_until "dockerd" "$state/dockerd.pid" "$state/logs/dockerd.log" docker info
  say "started dockerd (pid $(cat "$state/dockerd.pid"), log $state/logs/dockerd.log)"
fi

# -- proof: a volume written by one container is read by the next -------------------------
image=${PYFLOCK_IMAGE:-}
if [ -z "$image" ]; then
  if docker image inspect busybox:local >/dev/null 2>&1; then
    image=busybox:local
  else
    deploy/local/busybox-image.sh busybox:local >/dev/null
    image=busybox:local
    say "built the image busybox:local from busybox-static"
  fi
fi
prove() {  # what
  local check=pyflock-up-check proof
  docker run --rm -v "$check:/data" --volume-driver=pyflock "$image" \
    sh -c 'echo "written by pyflock make up" > /data/proof' >/dev/null
  proof=$(docker run --rm -v "$check:/data" --volume-driver=pyflock "$image" cat /data/proof)
  docker volume rm "$check" >/dev/null
  [ "$proof" = "written by pyflock make up" ] || { echo "up: the proof run read '$proof'" >&2; exit 1; }
  say "proved$1: a container wrote to a pyflock volume and the next one read it back"
}
prove ""
if [ -n "$ha" ]; then
  # Kill -9 the replica the agent is connected to (its log's latest channel-connected
  # event names it) when agents follow replicas (a list of hosts); else replica 2, the one
  # the agent does not use.
  victim=2
  if [ "$control_hosts" != 127.0.0.1 ]; then
    used=$(grep '"pyflock:agent:channel-connected"' "$state/logs/agent.log" | tail -n 1 |
      grep -o '"replica": "[0-9.]*' | grep -o '[0-9.]*$' || true)
    if [ "$used" = 127.0.0.1 ]; then victim=1; fi
  fi
  kill -9 "$(cat "$state/control-$victim.pid")"
  rm -f "$state/control-$victim.pid"
  say "killed replica $victim (kill -9)"
  prove " again with replica $victim dead"
  say "start it again with: make up HA=1"
fi
cat <<TXT
up: pyflock is up. Try:
      docker run --rm -v demo:/data --volume-driver=pyflock $image sh -c 'echo hi > /data/f'
      docker run --rm -v demo:/data --volume-driver=pyflock $image cat /data/f
      $bin/pyflock list
    Logs: $state/logs/. Stop with: make down (data is kept).
TXT
