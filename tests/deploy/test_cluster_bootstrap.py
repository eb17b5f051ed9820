"""
The CloudFormation bootstrap run for real on simulated hosts (issue 10, point 7;
tests.harness.sim_hosts): a control host and two agent hosts, each with a network and
mount namespace and a root folder of its own, run their launch template's UserData from
the template, which fetches the deploy scripts over https from a local ScriptsUrl and runs
deploy/cloudformation/bootstrap.sh. That installs pyflock through deploy/install.sh from a
wheel built from this checkout (no systemd: the units' own commands), with its SSM calls
going to moto_server, its instance metadata to fake metadata services, its data volume and
the agents' ebs backend to the fake EC2, and cfn-signal replaced by a recorder. Then a
``docker run`` on the first agent writes to a pyflock volume and one on the second reads it
back: the volume moved (an EBS detach and attach) between the hosts.
"""

from __future__ import annotations

import pytest

from tests.harness.deploy_hosts import BOOTSTRAP
from tests.harness.dockerd import BUSYBOX_TAG, require_e2e
from tests.harness.requirements import require_commands
from tests.harness.sim_hosts import STACK, aws_cli, build_wheel, sim_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """A wheel of pyflock built once per session from the checkout, its dependencies'
    wheels beside it."""
    require_e2e()
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def aws(tmp_path_factory):
    """A folder with the AWS CLI when none is on PATH (else None)."""
    return aws_cli(tmp_path_factory.mktemp("aws"))


@pytest.fixture(scope="module")
def booted(wheel, aws):
    """The simulated cluster after the control host's bootstrap and then both agent hosts'
    (at once); with each bootstrap's exit status."""
    require_commands("ip", "curl", "openssl", "mkfs.ext4", "blkid", "mountpoint")
    with sim_cluster(wheel, aws_folder=aws) as cluster:
        statuses = cluster.bootstrap([cluster.control])
        if statuses["ctl"] == 0:
            statuses.update(cluster.bootstrap(cluster.agents))
        yield cluster, statuses


def logs(host) -> str:
    """The end of a host's bootstrap output and of its services' logs, for failures."""
    parts = [f"--- {host.name} bootstrap:\n{host.log_tail('bootstrap', 40)}"]
    for log in sorted((host.root / "run" / "pyflock").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-20:]
        parts.append(f"--- {host.name} {log.name}:\n" + "\n".join(lines))
    return "\n".join(parts)


def test_control_node_boots_and_signals(booted):
    """The control UserData fetches the scripts; the bootstrap mounts its data volume, sets
    up the CA and control service
    from the wheel, puts the join token (a SecureString), the CA pin, its address and the
    API URL into SSM under /pyflock/<stack>/ and signals SUCCESS with the API URL."""
    cluster, statuses = booted
    assert statuses["ctl"] == 0, logs(cluster.control)
    assert "ctl SUCCESS control service answering at https://10.77.0.11:4523" \
        in cluster.recorded_signals()
    version = cluster.cli("version")
    assert version.returncode == 0, version.stderr
    assert "/var/lib/pyflock" in cluster.control.namespace_mounts()
    fetched = cluster.control.root / "opt" / "pyflock-deploy" / "cloudformation" / "bootstrap.sh"
    assert fetched.read_text() == BOOTSTRAP.read_text()
    parameters = cluster.ssm_parameters()
    assert set(parameters) == {f"/pyflock/{STACK}/{name}" for name in
                               ("join-token", "ca-pin", "control-hostname", "api-url")}
    assert parameters[f"/pyflock/{STACK}/api-url"] == ("String", "https://10.77.0.11:4523")
    assert parameters[f"/pyflock/{STACK}/control-hostname"] == ("String", "10.77.0.11")
    kind, token = parameters[f"/pyflock/{STACK}/join-token"]
    assert kind == "SecureString" and len(token) > 40
    assert parameters[f"/pyflock/{STACK}/ca-pin"][1].startswith("sha256:")


def test_agents_join_and_signal(booted):
    """Both agent bootstraps read the token from SSM, join the control node, start their
    agents on the ebs backend and signal SUCCESS with their instance ids; the control
    service lists both nodes."""
    cluster, statuses = booted
    for agent in cluster.agents:
        assert statuses.get(agent.name) == 0, logs(agent)
    signals = cluster.recorded_signals()
    for agent in cluster.agents:
        assert (f"{agent.name} SUCCESS agent {agent.instance_id} joined the cluster at "
                f"10.77.0.11") in signals
    listed = cluster.cli("list-nodes")
    assert listed.returncode == 0, listed.stderr
    for agent in cluster.agents:
        assert agent.address in listed.stdout


def test_docker_run_write_move_read(booted):
    """A container on the first agent writes to a pyflock volume; a container on the
    second reads it back, the volume's EBS volume now attached to the second instance."""
    cluster, statuses = booted
    assert all(status == 0 for status in statuses.values()), "the bootstraps failed"
    first, second = cluster.agents
    run = ("run", "--rm", "--network", "none", "-v", "boot-vol:/data", "--volume-driver",
           "pyflock", BUSYBOX_TAG)
    first.docker(*run, "sh", "-c", "echo hello > /data/f")
    assert second.docker(*run, "cat", "/data/f").stdout == "hello\n"
    attached = {v.attachment.instance_id for v in cluster.fake.volumes.values()
                if v.attachment is not None and v.volume_id != cluster.data_volume}
    assert attached == {second.instance_id}
