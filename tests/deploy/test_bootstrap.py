"""
deploy/cloudformation/bootstrap.sh on a stub host (tests.harness.deploy_hosts): an agent
node reads the control node's name and the join token from SSM with IMDSv2 metadata,
joins through install.sh with the ebs backend, and signals SUCCESS; a missing parameter
signals FAILURE; bad usage is refused before anything is called. (The full run on
simulated hosts with real services is a later part of issue 10.)
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness.deploy_hosts import BOOTSTRAP, MetadataService, make_stub_host
from tests.harness.requirements import require_root

pytestmark = pytest.mark.integration


@pytest.fixture
def host(tmp_path):
    """A stub host whose services are stopped afterwards."""
    host = make_stub_host(tmp_path)
    yield host
    host.install("--stop")


@pytest.fixture
def metadata():
    """The metadata service of instance i-0a1b2c in eu-west-1a."""
    service = MetadataService({"instance-id": "i-0a1b2c", "placement/region": "eu-west-1"})
    url = service.start()
    yield service, url
    service.stop()


def put(host, name: str, value: str) -> None:
    """Put ``value`` into the fake SSM at ``name``."""
    path = host.ssm / name.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")


def test_agent_node_joins_and_signals(host, metadata):
    """The agent bootstrap reads the control node's name and the token from SSM under
    /pyflock/<stack>/ (decrypted), joins with them on the ebs backend in its region,
    starts the agent and signals SUCCESS with its instance id, asking IMDS with a token."""
    service, url = metadata
    put(host, "/pyflock/flock/control-hostname", "ctl.internal")
    put(host, "/pyflock/flock/join-token", "SSM-TOKEN")
    result = host.bootstrap("agent", "--stack", "flock", "--region", "eu-west-1",
                            "--resource", "AgentGroup", "--from", "pyflock", metadata_url=url)
    assert result.returncode == 0, result.stderr
    assert host.signals.read_text() == \
        "SUCCESS agent i-0a1b2c joined the cluster at ctl.internal\n"
    assert host.called("pyflock-agent join") == [
        f"pyflock-agent join --control-service ctl.internal:4526 --token SSM-TOKEN "
        f"--config {host.config}/agent.yml"]
    assert "dataset: {backend: ebs, region: eu-west-1}" in (host.config / "agent.yml").read_text()
    assert host.running("pyflock-agent")
    assert ("aws --region eu-west-1 ssm get-parameter --name /pyflock/flock/join-token "
            "--with-decryption --query Parameter.Value --output text") in host.called("aws")
    assert ("GET", "/latest/meta-data/instance-id", True) in service.requests
    assert all(had_token for method, _, had_token in service.requests if method == "GET")


def test_missing_token_signals_failure(host, metadata):
    """Without a join token in SSM the bootstrap stops, signals FAILURE naming where it
    failed, and starts no agent."""
    _, url = metadata
    put(host, "/pyflock/flock/control-hostname", "ctl.internal")
    result = host.bootstrap("agent", "--stack", "flock", "--region", "eu-west-1",
                            "--resource", "AgentGroup", metadata_url=url)
    assert result.returncode != 0
    assert "ParameterNotFound" in result.stderr
    [signal] = host.signals.read_text().splitlines()
    assert signal.startswith("FAILURE bootstrap of the agent node failed at line ")
    assert host.called("pyflock-agent") == []
    assert not host.running("pyflock-agent")


@pytest.mark.parametrize("arguments, message", [
    ([], "bootstrap: give control, agent or rotate-token first"),
    (["agent", "--stack", "s"], "bootstrap: --stack and --region are needed"),
    (["control", "--stack", "s", "--region", "r"],
     "bootstrap: control needs --cluster-uuid and --data-volume"),
    (["agent", "--wrong"], "bootstrap: unknown option '--wrong'"),
])
def test_bootstrap_usage_errors(arguments, message):
    """The bootstrap refuses a missing role or option with status 2 and the reason, before
    it calls anything (no instance metadata, no AWS)."""
    env = {**os.environ, "PYFLOCK_METADATA_URL": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", str(BOOTSTRAP), *arguments], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == message


@pytest.fixture
def mounted_state(tmp_path):
    """A root whose /var/lib/pyflock is a mount point (a bind mount, as the data volume
    would be), unmounted afterwards."""
    require_root()
    root = tmp_path / "root"
    state = root / "var" / "lib" / "pyflock"
    state.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(state), str(state)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_control_node_stores_token_and_signals(host, metadata, mounted_state):
    """The control bootstrap, its data volume mounted, sets up the control node through
    install.sh on that volume under its public name, puts the join token, the CA pin, its
    name and the API URL (each from a file, never an argument) into SSM under
    /pyflock/<stack>/, and signals SUCCESS."""
    service, url = metadata
    name = "ec2-198-51-100-7.eu-west-1.compute.amazonaws.com"
    service.values.update({"public-hostname": name, "local-ipv4": "10.42.0.5"})
    result = host.bootstrap("control", "--stack", "flock", "--region", "eu-west-1",
                            "--resource", "ControlInstance", "--cluster-uuid",
                            "5f0c8c36-2f4e-4d0b-9a7e-0d6f1c2b3a4d", "--data-volume",
                            "vol-0123456789abcdef0", metadata_url=url, root=mounted_state)
    assert result.returncode == 0, result.stderr
    assert host.signals.read_text() == f"SUCCESS control service answering at https://{name}:4523\n"
    assert "pyflock-ca create-control-certificate " + name in host.called("pyflock-ca")
    assert "pyflock-ca initialize flock --cluster-uuid 5f0c8c36-2f4e-4d0b-9a7e-0d6f1c2b3a4d" \
        in host.called("pyflock-ca")
    parameters = host.ssm / "pyflock" / "flock"
    assert (parameters / "join-token").read_text() == "TOKEN-MADE-HERE"
    assert (parameters / "control-hostname").read_text() == name
    assert (parameters / "api-url").read_text() == f"https://{name}:4523"
    pin = (parameters / "ca-pin").read_text().strip()
    assert pin.startswith("sha256:") and len(pin) == len("sha256:") + 64
    puts = [c for c in host.called("aws") if "put-parameter" in c]
    # Every value from a file: AWS CLI v1 fetches a --value that looks like a URL.
    assert len(puts) == 4
    assert all(c.split("--value ")[1].startswith("file://") for c in puts)
    assert not any("TOKEN-MADE-HERE" in c for c in host.called("aws"))
    assert host.running("pyflock-control")
