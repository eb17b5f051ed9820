"""
A simulated host for deploy/install.sh and deploy/cloudformation/bootstrap.sh: its own
folders, and a virtualenv of stub console scripts that install.sh takes as an installed
pyflock. Each stub appends its name and arguments to a calls file; the control service and
agent stubs run until SIGTERM, the agent's creating its plugin socket first. Also a small
instance metadata service (IMDSv2 token flow) and a fake ``aws`` command for the bootstrap.
"""

from __future__ import annotations

import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
BOOTSTRAP = ROOT / "deploy" / "cloudformation" / "bootstrap.sh"

#: Stub console scripts: each appends its name and arguments to $PYFLOCK_CALLS.
STUBS = {
    "pyflock-ca": r"""
out=.
for a in "$@"; do case $prev in -o) out=$a ;; esac; prev=$a; done
case $1 in
  initialize) openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
                -subj /CN=stub -keyout cluster.key -out cluster.crt 2>/dev/null ;;
  create-control-certificate) touch "control-$2.crt" "control-$2.key" ;;
  create-api-certificate) touch "$out/$2.crt" "$out/$2.key" ;;
esac
""",
    "pyflock-control": r"""
trap 'exit 0' TERM
while :; do sleep 1; done
""",
    "pyflock": r"""
case " $* " in *" token create "*) echo TOKEN-MADE-HERE ;; esac
""",
    "pyflock-agent": r"""
config=$(for a in "$@"; do [ "${prev:-}" = --config ] && echo "$a"; prev=$a; done)
certs=$(sed -n 's/^certificates: //p' "$config")
case $1 in
  join)
    case " $* " in *" --token bad "*) echo "pyflock-agent: the token is not valid" >&2; exit 1 ;; esac
    touch "$certs/node.crt" "$certs/node.key" "$certs/cluster.crt" ;;
  run)
    socket=$(sed -n 's/^plugin: {socket: \(.*\)}$/\1/p' "$config")
    python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$socket"
    trap 'exit 0' TERM
    while :; do sleep 1; done ;;
esac
""",
}


#: ``aws``, as far as bootstrap.sh uses it: SSM parameters are files under $FAKE_SSM (a
#: missing one fails as AWS does); every call is recorded.
FAKE_AWS = r"""#!/bin/bash
echo "aws $*" >>"$PYFLOCK_CALLS"
name="" value=""
while [ $# -gt 0 ]; do
  case $1 in --name) name=$2; shift ;; --value) value=$2; shift ;; esac
  shift
done
file=$FAKE_SSM$name
if [ -n "$value" ]; then
  mkdir -p "$(dirname "$file")"
  case $value in file://*) cp "${value#file://}" "$file" ;; *) printf '%s\n' "$value" >"$file" ;; esac
elif [ -f "$file" ]; then
  cat "$file"
else
  echo "An error occurred (ParameterNotFound) when calling the GetParameter operation" >&2
  exit 254
fi
"""


def make_stub_host(tmp_path: Path) -> "StubHost":
    """A host under ``tmp_path`` whose /opt/pyflock holds the stubs (install.sh takes the
    requirement ``pyflock`` as installed there)."""
    prefix = tmp_path / "opt"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").symlink_to("/usr/bin/python3")
    (prefix / ".pyflock-requirement").write_text("pyflock\n")
    for name, body in STUBS.items():
        script = prefix / "bin" / name
        script.write_text(f'#!/bin/bash\necho "{name} $*" >>"$PYFLOCK_CALLS"\n{body}')
        script.chmod(0o755)
    return StubHost(tmp_path, prefix)


class StubHost:
    """One simulated host's folders and how to run install.sh and bootstrap.sh on it."""

    def __init__(self, tmp_path: Path, prefix: Path):
        self.tmp_path, self.prefix = tmp_path, prefix
        self.config = tmp_path / "etc"
        self.run_dir = tmp_path / "run"
        self.calls = tmp_path / "calls.log"
        self.socket = tmp_path / "plugin.sock"

    def environment(self) -> dict:
        """The environment the scripts run in: this host's HOME, calls file and
        /etc/default, and no join token from outside."""
        env = {**os.environ, "HOME": str(self.tmp_path), "PYFLOCK_CALLS": str(self.calls),
               "PYFLOCK_DEFAULTS_DIR": str(self.tmp_path / "default")}
        env.pop("PYFLOCK_JOIN_TOKEN", None)
        return env

    def install_options(self) -> list[str]:
        """install.sh's options that keep it inside this host: no apt, no systemd, its
        own folders."""
        return ["--no-apt", "--no-systemd", "--config-dir", str(self.config),
                "--data-dir", str(self.tmp_path / "data"), "--run-dir", str(self.run_dir),
                "--plugin-socket", str(self.socket)]

    def install(self, *options: str, token: str = "") -> subprocess.CompletedProcess:
        """Run install.sh in this host's folders (``token`` in PYFLOCK_JOIN_TOKEN)."""
        env = self.environment()
        if token:
            env["PYFLOCK_JOIN_TOKEN"] = token
        return subprocess.run(
            ["bash", str(INSTALL), "--prefix", str(self.prefix), *self.install_options(),
             *options], capture_output=True, text=True, env=env, timeout=120)

    def bootstrap(self, *arguments: str, metadata_url: str,
                  root: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run bootstrap.sh on this host with ``FAKE_AWS`` as ``aws`` (SSM parameters are
        files under ``ssm``), the metadata service at ``metadata_url``, and its signal
        recorded in ``signals``; ``root`` is prefixed to the paths it writes itself."""
        fake_bin = self.tmp_path / "fake-bin"
        fake_bin.mkdir(exist_ok=True)
        (fake_bin / "aws").write_text(FAKE_AWS)
        (fake_bin / "signal").write_text(f'#!/bin/bash\necho "$*" >>"{self.signals}"\n')
        for script in fake_bin.iterdir():
            script.chmod(0o755)
        env = {**self.environment(), "PATH": f"{fake_bin}:{os.environ['PATH']}",
               "FAKE_SSM": str(self.ssm), "PYFLOCK_METADATA_URL": metadata_url,
               "PYFLOCK_CFN_SIGNAL": str(fake_bin / "signal"),
               "PYFLOCK_PREFIX": str(self.prefix),
               "PYFLOCK_INSTALL_OPTIONS": " ".join(self.install_options()),
               "PYFLOCK_ROOT": str(root or "")}
        return subprocess.run(["bash", str(BOOTSTRAP), *arguments], capture_output=True,
                              text=True, env=env, timeout=120)

    @property
    def ssm(self) -> Path:
        """The fake SSM Parameter Store: one file per parameter, at its name."""
        return self.tmp_path / "ssm"

    @property
    def signals(self) -> Path:
        """The signals the bootstrap sent, one ``STATUS REASON`` line each."""
        return self.tmp_path / "signals"

    def called(self, prefix: str) -> list[str]:
        """The recorded calls starting with ``prefix``."""
        lines = self.calls.read_text().splitlines() if self.calls.exists() else []
        return [line for line in lines if line.startswith(prefix)]

    def command_line(self, unit: str) -> list[str]:
        """The arguments the running ``unit`` was started with (after the stub's shell)."""
        pid = int((self.run_dir / f"{unit}.pid").read_text())
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        return [a.decode() for a in arguments[1:]]

    def running(self, unit: str) -> bool:
        """Whether the pid file of ``unit`` names a live process."""
        pid_file = self.run_dir / f"{unit}.pid"
        if not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text()), 0)
        except ProcessLookupError:
            return False
        return True




class MetadataService:
    """
    The instance metadata service with IMDSv2 (on 127.0.0.1 unless told): ``PUT /latest/api/token``
    gives a session token, and ``GET /latest/meta-data/KEY`` answers ``values[KEY]`` only
    with that token (401 without it, 404 for an unknown key). Every request is noted in
    ``requests`` as (method, path, whether it carried the token).
    """

    TOKEN = "imds-session-token"

    def __init__(self, values: dict[str, str]):
        self.values = values
        self.requests: list[tuple[str, str, bool]] = []
        self._server: Optional[ThreadingHTTPServer] = None

    def start(self, host: str = "127.0.0.1") -> str:
        """Start serving on ``host``; the base URL."""
        service = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                service.requests.append(("PUT", self.path, False))
                if self.path == "/latest/api/token":
                    self._answer(200, service.TOKEN)
                else:
                    self._answer(404)

            def do_GET(self):
                has_token = self.headers.get("X-aws-ec2-metadata-token") == service.TOKEN
                service.requests.append(("GET", self.path, has_token))
                key = self.path.removeprefix("/latest/meta-data/")
                if not has_token:
                    self._answer(401)
                elif key in service.values:
                    self._answer(200, service.values[key])
                else:
                    self._answer(404)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        serve_in_thread(self._server)
        return f"http://{host}:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        stop_serving(self._server)


def serve_in_thread(server: ThreadingHTTPServer) -> None:
    """Serve ``server`` in a daemon thread."""
    threading.Thread(target=server.serve_forever, daemon=True).start()


def stop_serving(server: Optional[ThreadingHTTPServer]) -> None:
    """Stop ``server`` (if started) and close its socket."""
    if server is not None:
        server.shutdown()
        server.server_close()
