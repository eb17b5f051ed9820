#!/usr/bin/env bash
# The certificates of `make up` (called by up.sh), each key in the folder of whoever uses it
# (docs/security.md, "Where the keys belong"):
#   STATE/ca/     cluster.crt, cluster.key, issued.jsonl: the CA, for pyflock-ca and joins only
#   STATE/certs/  cluster.crt, control-service.crt/.key: the control service's folder
#   STATE/cli/    cluster.crt, admin.crt/.key: the CLI's folder
#   STATE/node/certs/  cluster.crt, node.crt/.key: the agent's folder
# Every folder is 0700. Idempotent: what exists is kept; a state folder of an earlier
# make up, which kept every key in STATE/certs, is moved to this layout.
set -euo pipefail
state=${1:?usage: certificates.sh STATE_DIR BIN_DIR}
bin=${2:?usage: certificates.sh STATE_DIR BIN_DIR}
ca=$state/ca
certs=$state/certs
cli=$state/cli
node=$state/node
say() { echo "up: $*"; }
mkdir -p "$ca" "$certs" "$cli" "$node/certs"
chmod 700 "$state" "$ca" "$certs" "$cli" "$node/certs"

if [ -f "$certs/cluster.key" ] && [ ! -f "$ca/cluster.key" ]; then
  # A state folder of an earlier make up kept every key in the control service's folder.
  cp "$certs/cluster.crt" "$ca/cluster.crt"
  mv "$certs/cluster.key" "$ca/cluster.key"
  if [ -f "$certs/issued.jsonl" ]; then mv "$certs/issued.jsonl" "$ca/issued.jsonl"; fi
  if [ -f "$certs/admin.key" ]; then
    mv "$certs/admin.crt" "$certs/admin.key" "$cli/" && cp "$certs/cluster.crt" "$cli/"
  fi
  say "moved the CA key to $ca and the admin user's key to $cli"
fi
if [ ! -f "$ca/cluster.crt" ]; then
  "$bin/pyflock-ca" initialize -o "$ca" local >/dev/null
  "$bin/pyflock-ca" create-control-certificate -i "$ca" -o "$certs" 127.0.0.1 >/dev/null
  mv "$certs/control-127.0.0.1.crt" "$certs/control-service.crt"
  mv "$certs/control-127.0.0.1.key" "$certs/control-service.key"
  cp "$ca/cluster.crt" "$certs/cluster.crt"
  "$bin/pyflock-ca" create-api-certificate -i "$ca" -o "$cli" admin >/dev/null
  cp "$ca/cluster.crt" "$cli/cluster.crt"
  say "created a cluster CA in $ca, the control service's certificate in $certs and the admin user's in $cli"
fi
if [ ! -f "$node/certs/node.crt" ]; then
  uuid=$("$bin/pyflock-ca" create-node-certificate -i "$ca" -o "$node/certs" 2>/dev/null)
  mv "$node/certs/$uuid.crt" "$node/certs/node.crt"
  mv "$node/certs/$uuid.key" "$node/certs/node.key"
  cp "$ca/cluster.crt" "$node/certs/cluster.crt"
  say "created this node's certificate (node $uuid)"
fi

