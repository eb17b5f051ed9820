"""
deploy/install.sh and deploy/cloudformation/bootstrap.sh: shellcheck finds nothing; bad
options get one clear line; and install.sh, run without systemd against a virtualenv of
stub console scripts (which record how they were called), sets up a control node, an agent
that joins, and both on one host, starting the services with the units' own commands, and
changes nothing when run again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.harness.deploy_hosts import BOOTSTRAP, INSTALL, make_stub_host
from tests.harness.requirements import require_commands

pytestmark = pytest.mark.integration


@pytest.fixture
def host(tmp_path):
    """A stub host (tests.harness.deploy_hosts); every service started on it is stopped
    afterwards."""
    host = make_stub_host(tmp_path)
    yield host
    host.install("--stop")


def test_shellcheck_finds_nothing():
    """shellcheck reports nothing on install.sh and the bootstrap script."""
    require_commands("shellcheck")
    result = subprocess.run(["shellcheck", str(INSTALL), str(BOOTSTRAP)],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "")


@pytest.mark.parametrize("options, message", [
    (["--join", "h"], "--join needs a token: --token TOKEN or PYFLOCK_JOIN_TOKEN"),
    (["--control", "--join", "h", "--token", "t"], "--join and --control exclude each other"),
    (["--agent"], "--agent goes with --control"),
    (["--backend", "zfs"], "--backend must be loopback or ebs, not 'zfs'"),
    (["--prefix", "opt/pyflock"], "paths must be absolute: 'opt/pyflock'"),
    (["--from"], "--from needs a value"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--metadata-url", "http://127.0.0.1:9"],
     "--ec2-endpoint-url, --metadata-url and --device-folder go with --backend ebs"),
    (["--backend", "ebs", "--device-folder", "dev"], "paths must be absolute: 'dev'"),
])
def test_bad_options_get_one_line(tmp_path, options, message):
    """A wrong option gets one line on stderr naming the problem, status 1, and nothing
    installed."""
    result = subprocess.run(["bash", str(INSTALL), "--prefix", str(tmp_path / "opt"), *options],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(f"install.sh: {message}")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "opt").exists()


def test_help_lists_every_option():
    """--help prints the usage, naming every option the script takes."""
    result = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for option in ("--from", "--control", "--join", "--token", "--backend", "--no-systemd",
                   "--stop", "--prefix", "--config-dir", "--data-dir", "--plugin-socket",
                   "--docker-socket", "--ec2-endpoint-url", "--metadata-url",
                   "--device-folder"):
        assert option in result.stdout


def test_control_node(host):
    """--control makes the CA and certificates, writes the control service's options and
    starts it with the unit's ExecStart; a second run keeps everything; --stop stops it."""
    result = host.install("--control", "--hostname", "10.0.0.9", "--cluster-name", "c1",
                          "--cluster-uuid", "0b7e4c7e-1111-4c1e-9d1e-5b1b2b3b4b5b")
    assert result.returncode == 0, result.stderr
    config, data = str(host.config), str(host.tmp_path / "data")
    assert host.called("pyflock-ca") == [
        "pyflock-ca initialize c1 --cluster-uuid 0b7e4c7e-1111-4c1e-9d1e-5b1b2b3b4b5b",
        "pyflock-ca create-control-certificate 10.0.0.9",
        "pyflock-ca create-api-certificate admin -o ../admin"]
    # The CA key in a folder of its own, not the control service's (issue 8, point 9).
    assert sorted(p.name for p in host.config.iterdir()) == [
        "admin", "ca", "cluster.crt", "control-service.crt", "control-service.key"]
    assert (host.config / "ca" / "cluster.key").exists()
    assert host.command_line("pyflock-control") == [
        str(host.prefix / "bin" / "pyflock-control"), "run", "--data-path", f"{data}/control",
        "--certificates-directory", config, "--ca-key", f"{config}/ca/cluster.key"]
    assert "control service answering at https://10.0.0.9:4523" in result.stdout

    again = host.install("--control", "--hostname", "10.0.0.9")
    assert again.returncode == 0, again.stderr
    assert "the cluster CA is already in" in again.stdout
    assert "pyflock-control already running" in again.stdout
    assert "wrote" not in again.stdout
    assert len(host.called("pyflock-ca initialize")) == 1

    assert host.install("--stop").returncode == 0
    assert not host.running("pyflock-control")


def test_control_and_agent_on_one_host(host):
    """--control --agent makes a one-use token with the admin certificate, joins this
    host with it and starts the agent on the loopback backend; run again, it joins no
    more."""
    result = host.install("--control", "--agent", "--hostname", "10.0.0.9")
    assert result.returncode == 0, result.stderr
    config = host.config
    assert host.called("pyflock --control-service 10.0.0.9") == [
        f"pyflock --control-service 10.0.0.9 --certs-path {config}/admin --user admin version",
        f"pyflock --control-service 10.0.0.9 --certs-path {config}/admin --user admin "
        f"token create --ttl 10m --uses 1"]
    assert host.called("pyflock-agent join") == [
        f"pyflock-agent join --control-service 10.0.0.9:4526 --token TOKEN-MADE-HERE "
        f"--config {config}/agent.yml"]
    agent_yml = (config / "agent.yml").read_text()
    assert "control-service: {hostname: 10.0.0.9, port: 4524, api-port: 4523}" in agent_yml
    assert "dataset: {backend: loopback, root_path: " in agent_yml
    assert host.command_line("pyflock-agent") == [
        str(host.prefix / "bin" / "pyflock-agent"), "run", "--config", f"{config}/agent.yml"]

    again = host.install("--control", "--agent", "--hostname", "10.0.0.9")
    assert again.returncode == 0, again.stderr
    assert "this host has already joined" in again.stdout, (result.stdout, again.stdout)
    assert len(host.called("pyflock-agent join")) == 1
    assert len(host.called("pyflock --control-service 10.0.0.9 --certs-path "
                           f"{config}/admin --user admin token")) == 1


def test_agent_joins_with_ebs_backend(host):
    """--join HOST:PORT with the token in PYFLOCK_JOIN_TOKEN writes agent.yml for the ebs
    backend, joins at that port and starts the agent; run again (no token needed once
    joined), it leaves the agent running, and with a changed option it restarts it."""
    result = host.install("--join", "ctl.example:4600", "--backend", "ebs", "--region",
                          "eu-west-1", token="T0KEN")
    assert result.returncode == 0, result.stderr
    agent_yml = (host.config / "agent.yml").read_text()
    assert "control-service: {hostname: ctl.example, port: 4524, api-port: 4523}" in agent_yml
    assert "dataset: {backend: ebs, region: eu-west-1}" in agent_yml
    assert host.called("pyflock-agent join") == [
        f"pyflock-agent join --control-service ctl.example:4600 --token T0KEN "
        f"--config {host.config}/agent.yml"]
    assert host.running("pyflock-agent")

    first = host.command_line("pyflock-agent"), (host.run_dir / "pyflock-agent.pid").read_text()
    same = host.install("--join", "ctl.example:4600", "--backend", "ebs", "--region",
                        "eu-west-1")
    assert "pyflock-agent already running" in same.stdout
    assert (host.command_line("pyflock-agent"), (host.run_dir / "pyflock-agent.pid").read_text()) == first
    host.socket.unlink()  # the stub agent does not remove its socket when it stops
    moved = host.install("--join", "ctl.example:4600", "--backend", "ebs", "--region",
                         "eu-north-1", token="T0KEN")
    assert moved.returncode == 0, moved.stderr
    assert "stopped pyflock-agent" in moved.stdout
    assert (host.run_dir / "pyflock-agent.pid").read_text() != first[1]


def test_agent_settings_for_tests_and_docker(host):
    """--docker-socket, and for the ebs backend --ec2-endpoint-url, --metadata-url and
    --device-folder (a fake EC2 in tests), go into agent.yml."""
    result = host.install("--join", "ctl.example", "--backend", "ebs", "--region", "us-east-1",
                          "--ec2-endpoint-url", "http://10.0.0.1:5000", "--metadata-url",
                          "http://10.0.0.1:5000/metadata/i-1", "--device-folder", "/tmp/dev",
                          "--docker-socket", "/tmp/docker.sock", "--no-start", token="T0KEN")
    assert result.returncode == 0, result.stderr
    agent_yml = (host.config / "agent.yml").read_text()
    assert ("dataset: {backend: ebs, region: us-east-1, endpoint_url: http://10.0.0.1:5000, "
            "metadata_url: http://10.0.0.1:5000/metadata/i-1, device_folder: /tmp/dev}"
            ) in agent_yml
    assert f"plugin: {{socket: {host.socket}, docker: /tmp/docker.sock}}" in agent_yml
    assert not host.running("pyflock-agent")


def test_refused_join_starts_nothing(host):
    """A join the control service refuses fails install.sh with the agent's own line and
    leaves the agent stopped and without certificates."""
    result = host.install("--join", "ctl.example", "--token", "bad")
    assert result.returncode == 1
    assert "pyflock-agent: the token is not valid" in result.stderr
    assert "install.sh: joining ctl.example:4526 failed" in result.stderr
    assert not (host.config / "node.crt").exists()
    assert not host.running("pyflock-agent")
    assert host.called("pyflock-agent run") == []


def test_stop_leaves_nothing_running(host):
    """--stop sends SIGTERM to the agent and the control service it started and waits
    for them to end."""
    assert host.install("--control", "--agent", "--hostname", "10.0.0.9").returncode == 0
    pids = [int((host.run_dir / f"{u}.pid").read_text()) for u in ("pyflock-agent", "pyflock-control")]
    assert host.install("--stop").returncode == 0
    deadline = time.monotonic() + 10
    for pid in pids:
        while True:
            try:
                os.kill(pid, signal.SIG_DFL)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"pid {pid} still running"
            time.sleep(0.05)

