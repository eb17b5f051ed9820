#!/usr/bin/env bash
# Installs pyflock on a Debian or Ubuntu host as a service, in one command: the system
# packages it needs (apt), pyflock in its own virtualenv (/opt/pyflock), the systemd units,
# and then either a control node (--control: CA, certificates, control service) or an agent
# that joins a cluster with a token (--join HOST --token TOKEN). Idempotent: run it again
# with the same options and it changes nothing (running services are left alone); with a
# new --from it upgrades and restarts them (the agent's mounts stay).
# Run with --help for the options; docs/install.md and docs/aws.md show it in use.
set -euo pipefail

usage() {
  cat <<'TXT'
Usage: install.sh [--from SPEC] [--control [--hostname NAME] [--agent]]
                  [--join HOST[:PORT] --token TOKEN] [options]

Installs pyflock into a virtualenv, installs its systemd units, and sets up this host as a
control node (--control), an agent node (--join), both (--control --agent), or neither.

What to install:
  --from SPEC        a pip requirement: a wheel file or URL (.whl), a git URL
                     (git+https://...), a version (0.1.0) or a name (default: pyflock)
  --upgrade          reinstall even if SPEC is already installed
  --prefix DIR       the virtualenv (default /opt/pyflock)

Control node:
  --control          make the cluster CA (pyflock-ca), the control service's certificate
                     and the user certificate "admin", and start pyflock-control
  --hostname NAME    the DNS name or IP address agents and users reach the control service
                     at, named in its certificate (default: this host's main IPv4 address)
  --cluster-name N   the CA's name (default: the host name)
  --cluster-uuid U   the cluster's uuid (default: a new one)
  --agent            also run an agent here (joins with a one-use token made here)

Agent node:
  --join HOST[:PORT] join the cluster whose control service is HOST (join port, default
                     4526) and start pyflock-agent; HOST must be the name its certificate
                     gives (the control node's --hostname)
  --token TOKEN      the join token (`pyflock token create`); or set PYFLOCK_JOIN_TOKEN,
                     which keeps it out of the process list; not needed once joined
  --backend NAME     the dataset backend: loopback (default) or ebs (on EC2)
  --region REGION    the ebs backend's region (default: from the instance metadata)
  --address ADDR     where peers reach this node (default: found by the agent)
  --no-docker        do not install docker.io when dockerd is missing
  --plugin-socket P  the Docker plugin's socket (default /run/docker/plugins/pyflock.sock)
  --docker-socket P  dockerd's API socket, whose mounts the agent counts
                     (default /var/run/docker.sock)
  --ec2-endpoint-url URL, --metadata-url URL, --device-folder DIR
                     the ebs backend's EC2 endpoint, instance metadata service and
                     device folder instead of AWS's and /dev (tests: a fake EC2)

Where things go:
  --config-dir DIR   configuration and certificates (default /etc/pyflock)
  --data-dir DIR     state: the control store, the agent's state (default /var/lib/pyflock)
  --no-apt           install no system packages (they must be there already)
  --no-systemd       start the services with the units' own commands (no systemd; in
                     containers and tests); pid files and logs under --run-dir
  --run-dir DIR      pid files and logs without systemd (default /run/pyflock)
  --no-start         install and configure, start nothing
  --stop             stop the services this script starts (mounts are left), then exit
  -h, --help         this help
TXT
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
spec=pyflock upgrade=no prefix=/opt/pyflock control=no agent=no hostname="" cluster_name=""
cluster_uuid="" join="" token=${PYFLOCK_JOIN_TOKEN:-} backend=loopback region="" address=""
docker=yes config_dir=/etc/pyflock data_dir=/var/lib/pyflock apt=yes systemd=auto
run_dir=/run/pyflock start=yes stop=no changed=no plugin_socket=/run/docker/plugins/pyflock.sock
docker_socket="" ec2_endpoint_url="" metadata_url="" device_folder=""
units_dir=${PYFLOCK_UNITS_DIR:-/etc/systemd/system}
defaults_dir=${PYFLOCK_DEFAULTS_DIR:-/etc/default}

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi; }
while [ $# -gt 0 ]; do
  case $1 in
    --from|--prefix|--hostname|--cluster-name|--cluster-uuid|--join|--token|--backend|\
    --region|--address|--config-dir|--data-dir|--run-dir|--plugin-socket|--docker-socket|\
    --ec2-endpoint-url|--metadata-url|--device-folder)
      need_value "$@" ;;&
    --from) spec=$2; shift ;;
    --upgrade) upgrade=yes ;;
    --prefix) prefix=$2; shift ;;
    --control) control=yes ;;
    --agent) agent=yes ;;
    --hostname) hostname=$2; shift ;;
    --cluster-name) cluster_name=$2; shift ;;
    --cluster-uuid) cluster_uuid=$2; shift ;;
    --join) join=$2; shift ;;
    --token) token=$2; shift ;;
    --backend) backend=$2; shift ;;
    --region) region=$2; shift ;;
    --address) address=$2; shift ;;
    --no-docker) docker=no ;;
    --plugin-socket) plugin_socket=$2; shift ;;
    --docker-socket) docker_socket=$2; shift ;;
    --ec2-endpoint-url) ec2_endpoint_url=$2; shift ;;
    --metadata-url) metadata_url=$2; shift ;;
    --device-folder) device_folder=$2; shift ;;
    --config-dir) config_dir=$2; shift ;;
    --data-dir) data_dir=$2; shift ;;
    --no-apt) apt=no ;;
    --no-systemd) systemd=no ;;
    --run-dir) run_dir=$2; shift ;;
    --no-start) start=no ;;
    --stop) stop=yes ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

# -- checking the options -----------------------------------------------------------------
case $backend in loopback|ebs) ;; *) die "--backend must be loopback or ebs, not '$backend'" ;; esac
if [ -n "$join" ] && [ "$control" = yes ]; then
  die "--join and --control exclude each other (a control node that also runs an agent: --control --agent)"
fi
if [ "$agent" = yes ] && [ "$control" = no ]; then
  die "--agent goes with --control; on an agent node use --join HOST --token TOKEN"
fi
if [ -n "$join" ] && [ -z "$token" ] && [ ! -f "$config_dir/node.crt" ]; then
  die "--join needs a token: --token TOKEN or PYFLOCK_JOIN_TOKEN (make one with 'pyflock token create')"
fi
if [ -n "$token" ] && [ -z "$join" ]; then die "--token goes with --join HOST"; fi
if [ "$backend" != ebs ] && [ -n "$ec2_endpoint_url$metadata_url$device_folder" ]; then
  die "--ec2-endpoint-url, --metadata-url and --device-folder go with --backend ebs"
fi
for d in "$prefix" "$config_dir" "$data_dir" "$run_dir" "$plugin_socket" ${docker_socket:+"$docker_socket"} \
         ${device_folder:+"$device_folder"}; do
  case $d in /*) ;; *) die "paths must be absolute: '$d'" ;; esac
done
if [ "$systemd" = auto ]; then
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then systemd=yes; else systemd=no; fi
fi
bin=$prefix/bin
certs=$config_dir

# -- running the units, with or without systemd --------------------------------------------
# A unit file as installed here: the paths it names moved to this installation's.
unit_text() {  # unit
  sed -e "s#/opt/pyflock/#$prefix/#g" -e "s#/etc/default/#$defaults_dir/#g" \
      -e "s#/etc/pyflock/#$config_dir/#g" "$here/systemd/$1.service"
}

# Without systemd: the unit's ExecStart run with the unit's Environment= and
# EnvironmentFile=, expanded as systemd does ($VAR split into words, ${VAR} one word).
unit_command() {  # unit: sets the array "command" and exports the unit's environment
  local text line value
  text=$(unit_text "$1")
  while IFS= read -r line; do
    case $line in
      Environment=*) value=${line#Environment=}; export "${value%%=*}=${value#*=}" ;;
      EnvironmentFile=*)
        value=${line#EnvironmentFile=}; value=${value#-}
        # shellcheck disable=SC1090  # the unit's own environment file
        if [ -f "$value" ]; then set -a; . "$value"; set +a; fi ;;
    esac
  done <<<"$text"
  value=$(grep '^ExecStart=' <<<"$text"); value=${value#ExecStart=}
  # shellcheck disable=SC2001  # ${VAR} becomes "${VAR}", one word; $VAR stays split
  eval "command=($(sed -e 's/\${\([A-Za-z_]*\)}/"${\1}"/g' <<<"$value"))"
}

pid_running() {  # unit
  local pid
  [ -f "$run_dir/$1.pid" ] || return 1
  pid=$(cat "$run_dir/$1.pid")
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$1"
}

start_unit() {  # unit
  if [ "$systemd" = yes ]; then
    systemctl enable "$1.service" >/dev/null 2>&1
    if [ "$changed" = yes ]; then
      systemctl restart "$1.service"; say "(re)started $1 (systemd; journalctl -u $1)"
    elif systemctl is-active -q "$1.service"; then
      say "$1 already running (systemd)"
    else
      systemctl start "$1.service"; say "started $1 (systemd; journalctl -u $1)"
    fi
  elif pid_running "$1" && [ "$changed" = yes ]; then
    stop_unit "$1"; start_unit "$1"
  elif pid_running "$1"; then
    say "$1 already running (pid $(cat "$run_dir/$1.pid"))"
  else
    local command
    mkdir -p "$run_dir"
    ( unit_command "$1"
      nohup "${command[@]}" >>"$run_dir/$1.log" 2>&1 </dev/null &
      echo $! >"$run_dir/$1.pid" )
    say "started $1 (pid $(cat "$run_dir/$1.pid"), log $run_dir/$1.log)"
  fi
}

stop_unit() {  # unit
  if [ "$systemd" = yes ]; then
    systemctl stop "$1.service" 2>/dev/null || true
  elif pid_running "$1"; then
    local pid; pid=$(cat "$run_dir/$1.pid")
    kill -TERM "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && die "$1 (pid $pid) did not stop within 60 s"
    rm -f "$run_dir/$1.pid"
    say "stopped $1"
  fi
}

wait_for() {  # what seconds unit command...
  local what=$1 seconds=$2 unit=$3; shift 3
  for _ in $(seq $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ "$systemd" = no ] && [ -n "$unit" ] && ! pid_running "$unit"; then
      tail -n 5 "$run_dir/$unit.log" >&2 || true
      die "$unit exited (log above, in $run_dir/$unit.log)"
    fi
    sleep 0.2
  done
  die "$what not within $seconds s${unit:+ (see the logs of $unit)}"
}

if [ "$stop" = yes ]; then
  stop_unit pyflock-agent
  stop_unit pyflock-control
  exit 0
fi

# -- system packages ----------------------------------------------------------------------
[ -f "$here/systemd/pyflock-control.service" ] ||
  die "the systemd units are not beside this script ($here/systemd/); run it from a pyflock checkout or release"
packages=(python3 python3-venv ca-certificates openssl)
case $spec in git+*|*.git|*.git@*) packages+=(git) ;; esac
if [ -n "$join" ] || [ "$agent" = yes ]; then
  packages+=(e2fsprogs util-linux mount)
  if [ "$docker" = yes ] && ! command -v dockerd >/dev/null; then packages+=(docker.io); fi
fi
if [ "$apt" = yes ]; then
  command -v dpkg-query >/dev/null || die "this is not a Debian or Ubuntu host (no dpkg); use --no-apt and install Python 3.11+ yourself"
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "system packages missing (${missing[*]}): run as root"
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
      die "apt-get install ${missing[*]} failed"
  fi
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  die "pyflock needs Python 3.11 or newer (Debian 12, Ubuntu 24.04); this host has $(python3 --version 2>&1)"

# -- pyflock in its virtualenv ------------------------------------------------------------
case $spec in
  [0-9]*) requirement="pyflock==$spec" ;;
  http://*.git|https://*.git|http://*.git@*|https://*.git@*) requirement="git+$spec" ;;
  *) requirement=$spec ;;
esac
stamp=$prefix/.pyflock-requirement
if [ ! -x "$bin/python" ]; then
  python3 -m venv "$prefix" || die "python3 -m venv $prefix failed (is python3-venv installed?)"
fi
if [ "$upgrade" = yes ] || [ ! -x "$bin/pyflock-control" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$requirement" ]; then
  say "pip install $requirement into $prefix"
  if ! { "$bin/pip" install -q --disable-pip-version-check -U pip &&
         "$bin/pip" install -q --disable-pip-version-check --upgrade "$requirement"; } \
       >"$prefix/pip.log" 2>&1; then
    tail -n 20 "$prefix/pip.log" >&2; die "pip install $requirement failed (log above, all of it in $prefix/pip.log)"
  fi
  echo "$requirement" >"$stamp"
  changed=yes
else
  say "$requirement already installed in $prefix"
fi
for script in pyflock-control pyflock-agent pyflock-ca pyflock; do
  [ -x "$bin/$script" ] || die "$requirement did not install $script: is it pyflock?"
done

# -- units ------------------------------------------------------------------------------
if [ "$systemd" = yes ]; then
  units_changed=no
  for unit in pyflock-control pyflock-agent; do
    if ! unit_text "$unit" | cmp -s - "$units_dir/$unit.service"; then
      unit_text "$unit" >"$units_dir/$unit.service"; units_changed=yes; changed=yes
    fi
  done
  if [ "$units_changed" = yes ]; then systemctl daemon-reload; say "installed the systemd units in $units_dir"; fi
fi

# Writes a file only when its text changes; says so, and notes that the services restart.
write_file() {  # path mode  (text on stdin)
  local text; text=$(cat)
  if [ "$(cat "$1" 2>/dev/null)" != "$text" ]; then
    mkdir -p "$(dirname "$1")"
    (umask 077; printf '%s\n' "$text" >"$1.new")
    chmod "$2" "$1.new"; mv "$1.new" "$1"
    say "wrote $1"
    changed=yes
  fi
}

main_address() {
  local a
  a=$(ip -4 route get 192.0.2.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
  [ -n "$a" ] || a=$(hostname -I 2>/dev/null | awk '{print $1}')
  echo "${a:-127.0.0.1}"
}

# The CLI as the user admin, whose certificate --control makes.
admin() { "$bin/pyflock" --control-service "$hostname" --certs-path "$certs/admin" --user admin "$@"; }

# -- control node -------------------------------------------------------------------------
if [ "$control" = yes ]; then
  [ -n "$hostname" ] || hostname=$(main_address)
  [ -n "$cluster_name" ] || cluster_name=$(hostname -s 2>/dev/null || echo pyflock)
  mkdir -p "$certs" && chmod 700 "$certs"
  ca=$certs/ca  # the CA key in a folder of its own, not the service's (docs/security.md)
  if [ ! -f "$certs/cluster.crt" ]; then
    (mkdir -p "$ca" && chmod 700 "$ca" && cd "$ca"
     "$bin/pyflock-ca" initialize "$cluster_name" ${cluster_uuid:+--cluster-uuid "$cluster_uuid"} >/dev/null
     "$bin/pyflock-ca" create-control-certificate "$hostname" >/dev/null
     mv "control-$hostname.crt" ../control-service.crt
     mv "control-$hostname.key" ../control-service.key
     mkdir -p ../admin && chmod 700 ../admin
     "$bin/pyflock-ca" create-api-certificate admin -o ../admin >/dev/null
     cp cluster.crt ../cluster.crt && cp cluster.crt ../admin/cluster.crt) \
      || die "making the cluster CA in $ca failed"
    say "made the cluster CA in $ca, the control certificate for $hostname in $certs and the user certificate admin in $certs/admin"
  else
    say "the cluster CA is already in $certs (kept)"
  fi
  [ -f "$ca/cluster.key" ] || ca=$certs  # installed when the CA key lay beside the service's
  write_file "$defaults_dir/pyflock-control" 0644 <<TXT
# Written by pyflock's deploy/install.sh; read by pyflock-control.service.
PYFLOCK_CONTROL_OPTIONS="--data-path $data_dir/control --certificates-directory $certs --ca-key $ca/cluster.key"
TXT
  # The CLI's settings for root, unless root already has settings of its own.
  cli_yml=${HOME:-/root}/.config/pyflock/cli.yml
  if [ "$(id -u)" = 0 ] && { [ ! -f "$cli_yml" ] || grep -q "deploy/install.sh" "$cli_yml"; }; then
    write_file "$cli_yml" 0600 <<TXT
# Written by pyflock's deploy/install.sh: the CLI as the user admin.
control-service: $hostname
control-port: 4523
certs-path: $certs/admin
user: admin
TXT
  fi
  if [ "$start" = yes ]; then
    start_unit pyflock-control
    wait_for "the control service answering" 60 pyflock-control \
      admin version
    say "control service answering at https://$hostname:4523"
  fi
  if [ "$agent" = yes ]; then
    join=$hostname
    if [ ! -f "$certs/node.crt" ] && [ "$start" = yes ]; then
      token=$(admin token create --ttl 10m --uses 1) ||
        die "could not make a join token for the agent on this host"
    fi
  fi
fi

# -- agent node ---------------------------------------------------------------------------
if [ -n "$join" ]; then
  control_host=${join%:*}
  case $join in *:*) join_port=${join##*:} ;; *) join_port=4526 ;; esac
  case $join_port in ''|*[!0-9]*) die "--join HOST[:PORT]: '$join_port' is not a port" ;; esac
  node=""
  [ -z "$address" ] || node="node: {address: $address}"
  if [ "$backend" = ebs ]; then
    dataset="{backend: ebs${region:+, region: $region}${ec2_endpoint_url:+, endpoint_url: $ec2_endpoint_url}"
    dataset="$dataset${metadata_url:+, metadata_url: $metadata_url}${device_folder:+, device_folder: $device_folder}}"
  else
    dataset="{backend: loopback, root_path: $data_dir/loopback, default_size: 10G}"
  fi
  write_file "$config_dir/agent.yml" 0644 <<YML
# Written by pyflock's deploy/install.sh (docs/operations.md describes every key).
version: 1
control-service: {hostname: $control_host, port: 4524, api-port: 4523}
certificates: $certs
data-path: $data_dir
mount-root: $data_dir/mounts
$node
dataset: $dataset
plugin: {socket: $plugin_socket${docker_socket:+, docker: $docker_socket}}
YML
  write_file "$defaults_dir/pyflock-agent" 0644 <<TXT
# Written by pyflock's deploy/install.sh; read by pyflock-agent.service.
PYFLOCK_AGENT_CONFIG=$config_dir/agent.yml
TXT
  if [ -f "$certs/node.crt" ] && [ -f "$certs/node.key" ]; then
    say "this host has already joined (its certificate is $certs/node.crt)"
  elif [ -z "$token" ]; then
    die "this host has not joined yet and there is no token"
  else
    "$bin/pyflock-agent" join --control-service "$control_host:$join_port" \
      --token "$token" --config "$config_dir/agent.yml" ||
      die "joining $control_host:$join_port failed (the line above says why); nothing was written"
    say "joined the cluster at $control_host:$join_port"
  fi
  if [ "$start" = yes ]; then
    start_unit pyflock-agent
    wait_for "the agent's Docker plugin socket" 120 pyflock-agent test -S "$plugin_socket"
    say "agent running; Docker: docker run -v NAME:/data --volume-driver=pyflock IMAGE"
  fi
fi
say "done"
