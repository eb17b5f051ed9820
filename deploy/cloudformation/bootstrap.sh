#!/usr/bin/env bash
# Boots one node of the pyflock CloudFormation stack (pyflock-cluster.yaml), as root, from
# the node's UserData; deploy/install.sh does the installing. Nothing secret passes through
# the template, the UserData or S3: the control node makes the CA on its own data volume and
# keeps a multi-use join token in SSM Parameter Store (a SecureString, replaced daily);
# agent nodes read it with their instance role, join, and start.
#
#   bootstrap.sh control --stack S --region R --resource ID --cluster-uuid U --from SPEC --data-volume VOL
#   bootstrap.sh agent   --stack S --region R --resource ID --from SPEC
#   bootstrap.sh rotate-token --stack S --region R     (the daily timer on the control node)
#
# When it ends, it tells CloudFormation (SUCCESS or FAILURE, with the reason) through
# `aws cloudformation signal-resource` with the instance role.
#
# For tests, the environment may point it elsewhere: PYFLOCK_METADATA_URL (the instance
# metadata service), PYFLOCK_AWS_ENDPOINT_URL (SSM and CloudFormation), PYFLOCK_CFN_SIGNAL
# (a command run as `CMD STATUS REASON` instead of signalling), PYFLOCK_INSTALL_OPTIONS
# (more options for install.sh, such as --no-systemd; the bootstrap's own come after them), PYFLOCK_PREFIX (the virtualenv,
# default /opt/pyflock), PYFLOCK_ROOT (a folder prefixed to the paths it writes outside
# install.sh) and PYFLOCK_DEVICE_FOLDER (instead of /dev).
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
install_sh=$here/../install.sh
metadata=${PYFLOCK_METADATA_URL:-http://169.254.169.254}
root=${PYFLOCK_ROOT:-}
devices=${PYFLOCK_DEVICE_FOLDER:-/dev}
prefix=${PYFLOCK_PREFIX:-/opt/pyflock}
# The data volume of the control node, and where its state lives.
state=$root/var/lib/pyflock
certs=$state/certs
read -r -a install_options <<<"${PYFLOCK_INSTALL_OPTIONS:-}"

say() { echo "bootstrap: $*"; }
usage() { sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

role=${1:-}
[ $# -gt 0 ] && shift
stack="" region="" resource="" cluster_uuid="" from=pyflock data_volume="" instance_id=""
while [ $# -gt 0 ]; do
  case $1 in
    --stack) stack=${2:-}; shift ;;
    --region) region=${2:-}; shift ;;
    --resource) resource=${2:-}; shift ;;
    --cluster-uuid) cluster_uuid=${2:-}; shift ;;
    --from) from=${2:-}; shift ;;
    --data-volume) data_volume=${2:-}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bootstrap: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case $role in
  control|agent|rotate-token) ;;
  -h|--help) usage; exit 0 ;;
  *) echo "bootstrap: give control, agent or rotate-token first" >&2; usage >&2; exit 2 ;;
esac
if [ -z "$stack" ] || [ -z "$region" ]; then
  echo "bootstrap: --stack and --region are needed" >&2; exit 2
fi
parameters=/pyflock/$stack

aws_() {
  aws --region "$region" ${PYFLOCK_AWS_ENDPOINT_URL:+--endpoint-url "$PYFLOCK_AWS_ENDPOINT_URL"} "$@"
}

# Tells CloudFormation how the boot ended (once); a recorder replaces it in tests.
signalled=no
signal() {  # SUCCESS|FAILURE reason
  [ "$signalled" = no ] && [ -n "$resource" ] || return 0
  signalled=yes
  if [ -n "${PYFLOCK_CFN_SIGNAL:-}" ]; then
    $PYFLOCK_CFN_SIGNAL "$1" "$2"
  else
    aws_ cloudformation signal-resource --stack-name "$stack" --logical-resource-id "$resource" \
      --unique-id "$instance_id" --status "$1" >/dev/null ||
      echo "bootstrap: could not signal $1 to CloudFormation" >&2
  fi
}
failed() {  # line
  # A command substitution that fails runs this trap too (set -E): the main shell signals.
  [ "$BASHPID" = "$$" ] || return 0
  echo "bootstrap: failed at line $1 of $0" >&2
  signal FAILURE "bootstrap of the $role node failed at line $1 (see /var/log/cloud-init-output.log)"
}
trap 'failed $LINENO' ERR

# Instance metadata with an IMDSv2 session token (the template requires them).
imds_token=""
imds() {  # path
  if [ -z "$imds_token" ]; then
    imds_token=$(curl -fsS --retry 10 --retry-connrefused -X PUT "$metadata/latest/api/token" \
                      -H "X-aws-ec2-metadata-token-ttl-seconds: 21600")
  fi
  curl -fsS --retry 10 --retry-connrefused -H "X-aws-ec2-metadata-token: $imds_token" \
       "$metadata/latest/meta-data/$1"
}

# The AWS CLI, for SSM and the signal (Debian's package; the instance role gives it keys).
need_aws_cli() {
  command -v aws >/dev/null && return 0
  say "apt-get install awscli"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends awscli curl >/dev/null
}

# The sha256 of the CA's public key (SubjectPublicKeyInfo), as join tokens carry it.
ca_pin() {
  printf '%s' "sha256:$(openssl x509 -in "$certs/cluster.crt" -pubkey -noout |
                 openssl pkey -pubin -outform der | openssl dgst -sha256 -r | cut -d' ' -f1)"
}

# The value on stdin into SSM as $parameters/NAME. It goes through a 0600 file
# (file://), never a command line (the join token is secret), and AWS CLI v1 would fetch
# a value that looks like a URL (the API URL, https://...) instead of storing it.
put_parameter() {  # name type
  local file
  file=$(mktemp "${TMPDIR:-/tmp}/pyflock-parameter.XXXXXX")  # mode 0600
  cat >"$file"
  if ! aws_ ssm put-parameter --name "$parameters/$1" --type "$2" --overwrite \
         --value "file://$file" >/dev/null; then
    rm -f "$file"; return 1
  fi
  rm -f "$file"
}

# A new multi-use join token into SSM (a SecureString), the CA pin and the control node's
# name beside it. Tokens last two days and are replaced daily, so a node joining at the
# moment of a replacement still holds a valid one.
rotate_token() {
  local token admin_host
  admin_host=$(cat "$certs/control-hostname")
  token=$("$prefix/bin/pyflock" --control-service "$admin_host" --certs-path "$certs/admin" \
            --user admin token create --ttl 48h --uses 10000)
  printf '%s' "$token" | put_parameter join-token SecureString
  ca_pin | put_parameter ca-pin String
  printf '%s' "$admin_host" | put_parameter control-hostname String
  say "a new join token is in SSM at $parameters/join-token"
}

# The block device of an attached EBS volume, found by its id: the NVMe serial link on
# Nitro, /dev/xvdX on Xen (never by comparing device lists).
volume_device() {  # volume-id xen-name
  local link="$devices/disk/by-id/nvme-Amazon_Elastic_Block_Store_${1//-/}"
  for _ in $(seq 150); do
    if [ -e "$link" ]; then readlink -f "$link"; return 0; fi
    if [ -b "$devices/$2" ]; then echo "$devices/$2"; return 0; fi
    sleep 2
  done
  echo "bootstrap: the data volume $1 did not appear within 5 minutes" >&2
  return 1
}

# The control node's data volume at /var/lib/pyflock: made once, mounted at every boot.
mount_data_volume() {
  local device
  if mountpoint -q "$state"; then say "$state is mounted"; return 0; fi
  device=$(volume_device "$data_volume" xvdf)
  if ! blkid "$device" >/dev/null 2>&1; then
    say "making a filesystem on the new data volume $data_volume ($device)"
    mkfs.ext4 -q -L pyflock-data "$device"
  fi
  mkdir -p "$state"
  if ! grep -q "LABEL=pyflock-data" "$root/etc/fstab" 2>/dev/null; then
    echo "LABEL=pyflock-data /var/lib/pyflock ext4 defaults,nofail 0 2" >>"$root/etc/fstab"
  fi
  mount "$device" "$state"
  chmod 700 "$state"
  say "data volume $data_volume mounted at $state"
}

# The daily replacement of the join token (systemd timer; none without systemd).
install_rotation_timer() {
  local script=$here/bootstrap.sh
  if ! [ -d /run/systemd/system ] || [ -n "$root" ]; then
    say "no systemd: the join token is not replaced daily (run '$0 rotate-token' yourself)"
    return 0
  fi
  cat >/etc/systemd/system/pyflock-join-token.service <<UNIT
[Unit]
Description=Replace the pyflock join token in SSM Parameter Store
After=pyflock-control.service
Requires=pyflock-control.service

[Service]
Type=oneshot
ExecStart=/bin/bash $script rotate-token --stack $stack --region $region
UNIT
  cat >/etc/systemd/system/pyflock-join-token.timer <<UNIT
[Unit]
Description=Replace the pyflock join token daily

[Timer]
OnCalendar=daily
RandomizedDelaySec=1h
Persistent=true

[Install]
WantedBy=timers.target
UNIT
  systemctl daemon-reload
  systemctl enable --now pyflock-join-token.timer >/dev/null 2>&1
  say "the join token is replaced daily (pyflock-join-token.timer)"
}

case $role in
  rotate-token)
    rotate_token ;;

  control)
    if [ -z "$cluster_uuid" ] || [ -z "$data_volume" ]; then
      echo "bootstrap: control needs --cluster-uuid and --data-volume" >&2; exit 2
    fi
    instance_id=$(imds instance-id)
    need_aws_cli
    mount_data_volume
    # Agents and users reach the control node by its public DNS name, which inside the VPC
    # resolves to its private address; without one, by its private address.
    hostname=$(imds public-hostname 2>/dev/null || true)
    [ -n "$hostname" ] || hostname=$(imds local-ipv4)
    if [ -f "$certs/control-hostname" ] && [ "$(cat "$certs/control-hostname")" != "$hostname" ]; then
      say "this data volume's CA was made for $(cat "$certs/control-hostname"), now $hostname: keeping the old name"
      hostname=$(cat "$certs/control-hostname")
    fi
    bash "$install_sh" "${install_options[@]}" --from "$from" --prefix "$prefix" --control \
      --hostname "$hostname" --cluster-name "$stack" --cluster-uuid "$cluster_uuid" \
      --config-dir "$certs" --data-dir "$state" --no-docker
    echo "$hostname" >"$certs/control-hostname"
    rotate_token
    printf '%s' "https://$hostname:4523" | put_parameter api-url String
    install_rotation_timer
    signal SUCCESS "control service answering at https://$hostname:4523"
    say "control node ready" ;;

  agent)
    instance_id=$(imds instance-id)
    need_aws_cli
    control_host=""
    for _ in $(seq 30); do
      control_host=$(aws_ ssm get-parameter --name "$parameters/control-hostname" \
                       --query Parameter.Value --output text 2>/dev/null) && break
      sleep 10
    done
    [ -n "$control_host" ] || { echo "bootstrap: no $parameters/control-hostname in SSM" >&2; false; }
    # The token goes to install.sh through its environment, not on its command line.
    PYFLOCK_JOIN_TOKEN=$(aws_ ssm get-parameter --name "$parameters/join-token" --with-decryption \
                           --query Parameter.Value --output text)
    export PYFLOCK_JOIN_TOKEN
    bash "$install_sh" "${install_options[@]}" --from "$from" --prefix "$prefix" \
      --join "$control_host" --backend ebs --region "$region"
    unset PYFLOCK_JOIN_TOKEN
    signal SUCCESS "agent $instance_id joined the cluster at $control_host"
    say "agent node ready" ;;
esac
