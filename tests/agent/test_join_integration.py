"""
Joining for real: a real ``pyflock-control`` serving joins on 127.0.0.x over TLS, and real
``pyflock-agent join`` processes on "new hosts" (folders with only an agent.yml). A join
with a good token writes the node's files and the new certificate then works; a used-up
token and a token pinning another CA are refused and write nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet.defer import Deferred

from pyflock.agent._channel import AgentChannel, control_endpoint
from pyflock.agent._view import ViewFile
from pyflock.common._ca import (
    CertificateIndex, common_name_of, initialize, load_certificate,
)
from pyflock.common._tls import ClusterTLS
from pyflock.common._tokens import authority_pin, parse_token
from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess
from tests.harness.processes import free_address, run_to_completion, script_path

pytestmark = pytest.mark.integration


@pytest.fixture
def reactor():
    """The global reactor."""
    from twisted.internet import reactor
    return reactor


def _new_host(folder: Path, control_host: str) -> Path:
    """A new host's agent.yml (its certificates folder not made yet); its path."""
    folder.mkdir()
    config = folder / "agent.yml"
    config.write_text(
        "version: 1\n"
        f"control-service: {{hostname: {control_host}}}\n"
        f"certificates: {folder / 'certs'}\n"
        f"dataset: {{backend: loopback, root_path: {folder / 'loopback'}}}\n")
    return config


def _join(config: Path, control: ControlProcess, token: str, stdin: bool = False):
    """Run ``pyflock-agent join`` (the token on stdin with ``stdin``); the process."""
    argv = [script_path("pyflock-agent"), "join", "--config", str(config),
            "--control-service", f"{control.host}:{control.join_port}",
            "--token", "-" if stdin else token]
    if stdin:
        return subprocess.run(argv, input=token + "\n", capture_output=True, text=True,
                              timeout=60)
    return run_to_completion(argv)


async def _agent_channel_admits(reactor, control: ControlProcess, folder: Path,
                                node_uuid: str, tmp_path: Path) -> None:
    """The agent channel admits the joined node's certificate: its view names the node."""
    views = []
    seen: Deferred = Deferred()

    def on_view(view):
        views.append(view)
        if view.nodes and not seen.called:
            seen.callback(view)
    view_file = ViewFile(tmp_path / "joined-view.json", reactor)
    channel = AgentChannel(
        reactor, control_endpoint(reactor, control.host, control.agent_port,
                                  ClusterTLS.load(folder, "node")),
        node_uuid, "era-joined", on_view, save_view=view_file.save, heartbeat=0.5,
        timeout=2.0, retry_policy=lambda failures: 0.2)
    channel.start()
    try:
        view = await seen.addTimeout(30, reactor)
        assert node_uuid in view.nodes
    finally:
        await channel.stop()


@pytest_twisted.ensureDeferred
async def test_join(tmp_path, reactor):
    """
    A host joins with a one-use token given on stdin: node.key (0600), node.crt and cluster.crt in a new
    0700 folder, and the REST API and the agent channel accept the new certificate; the same token then fails
    on a second host in one line, and a token pinning another CA is refused before it is
    sent; neither writes anything.
    """
    host, _ = free_address()
    certificates = tmp_path / "certs"
    certificates.mkdir()
    cluster = make_cluster_certificates(certificates, nodes=0, control_host=host)
    control = ControlProcess(tmp_path / "data", cluster.path, host=host,
                             log_directory=tmp_path / "logs")
    alice = APIClient(reactor, control.url, cluster.path, "alice")
    try:
        control.start()
        await alice.fetch_openapi()
        created = await alice.post("/v1/tokens", {"uses": 1})
        assert created.code == 201, created
        token = created.json["token"]

        first = _new_host(tmp_path / "host1", host)
        joined = _join(first, control, token, stdin=True)
        assert joined.returncode == 0, joined.stderr
        folder = first.parent / "certs"
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(folder / "node.key").st_mode) == 0o600
        assert (folder / "cluster.crt").read_bytes() == (cluster.path /
                                                         "cluster.crt").read_bytes()
        node = APIClient(reactor, control.url, folder, "node")
        try:
            listed = await node.get("/v1/configuration/datasets")
        finally:
            await node.close()
        assert listed.code == 200
        name = common_name_of(load_certificate(folder / "node.crt"))
        assert name.startswith("node-") and f"as node {name[5:]}" in joined.stdout
        issued = CertificateIndex.beside(cluster.path / "cluster.key").entries()
        assert [(e.common_name, e.issued_by) for e in issued][-1] == (name, "join")
        await _agent_channel_admits(reactor, control, folder, name[5:], tmp_path)

        second = _new_host(tmp_path / "host2", host)
        refused = _join(second, control, token)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "is used up" in refused.stderr
        assert not (second.parent / "certs").exists()

        other = tmp_path / "other-ca"
        other.mkdir()
        initialize(other, "other")
        fresh = (await alice.post("/v1/tokens", {})).json
        parsed = parse_token(fresh["token"])
        forged = str(parsed).replace(parsed.pin,
                                     authority_pin(load_certificate(other / "cluster.crt")))
        third = _new_host(tmp_path / "host3", host)
        refused = _join(third, control, forged)
        assert refused.returncode == 1
        assert "is not the one this token is for" in refused.stderr
        assert not (third.parent / "certs").exists()
        [listed_token] = [t for t in (await alice.get("/v1/tokens")).json
                          if t["token_id"] == parsed.token_id]
        assert listed_token["used"] == 0
    finally:
        await alice.close()
        control.close()


@pytest_twisted.ensureDeferred
async def test_ca_key_option(tmp_path, reactor):
    """
    Without cluster.key in its certificates folder the control service serves no joins,
    says so in its log and answers 409 to token requests; given the key with --ca-key
    (elsewhere), it serves them.
    """
    host, _ = free_address()
    authority = tmp_path / "ca"
    authority.mkdir()
    cluster = make_cluster_certificates(authority, nodes=0, control_host=host)
    certificates = tmp_path / "certs"
    certificates.mkdir()
    for name in ("cluster.crt", "control-service.crt", "control-service.key", "alice.crt",
                 "alice.key"):
        (certificates / name).write_bytes((cluster.path / name).read_bytes())
    for run, extra in enumerate(((), ("--ca-key", str(authority / "cluster.key")))):
        control = ControlProcess(tmp_path / f"data{run}", certificates, host=host,
                                 log_directory=tmp_path / f"logs{run}",
                                 extra_arguments=extra)
        alice = APIClient(reactor, control.url, certificates, "alice")
        try:
            control.start()
            created = await alice.post("/v1/tokens", {})
            if extra:
                assert created.code == 201 and control.log_events("pyflock:control:joins-on")
            else:
                assert created.code == 409 and "--ca-key" in created.json["description"]
                [off] = control.log_events("pyflock:control:joins-off")
                assert "no CA key" in off["reason"]
        finally:
            await alice.close()
            control.close()
