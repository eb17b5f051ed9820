#!/usr/bin/env bash
# Installs what pyflock and its tests need on Debian/Ubuntu, as root: system packages
# (only those missing) and a virtualenv with pyflock in editable mode. Idempotent and quick
# when everything is already there.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/../.."

packages=(docker.io containerd runc busybox-static btrfs-progs e2fsprogs util-linux mount
          iproute2 etcd-server etcd-client openssl curl python3-venv shellcheck)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install: missing system packages (${missing[*]}); run as root" >&2; exit 1
  fi
  echo "install: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts etcd.service where systemd runs; pyflock's tests start their own.
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
fi

stamp="$venv/.pyflock-installed"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "install: pip install -e '.[test]' into $venv"
  if ! { "$venv/bin/pip" install -q --disable-pip-version-check -U pip &&
         "$venv/bin/pip" install -q --disable-pip-version-check -e '.[test]'; } \
       >"$venv/pip.log" 2>&1; then
    cat "$venv/pip.log" >&2; echo "install: pip failed (log above)" >&2; exit 1
  fi
  touch "$stamp"
fi
