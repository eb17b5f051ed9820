"""
Attacks on a real ``pyflock-control`` process (issue 8), each made for real with curl,
openssl s_client or treq and a stolen node certificate, and each shown to fail harmlessly:
unbounded leases, oversized and hostile bodies, idle connections, weak TLS suites, one
node flooding the cluster with datasets and writes.
"""

import json
import socket
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from pyflock.common._ca import CERTIFICATE_LIFETIME, create_node_certificate

from tests.control import test_integration as integration
from tests.harness.processes import script_path

# The fixtures of the control service's integration tests: a cluster's certificates, real
# control processes and API clients.
reactor, cluster = integration.reactor, integration.cluster
controls, clients = integration.controls, integration.clients
create, curl = integration.create, integration.curl

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"
LEASES = "/v1/configuration/leases"


def lease_body(dataset_id, node_uuid, expires):
    """The JSON text of a lease request."""
    return json.dumps({"dataset_id": dataset_id, "node_uuid": node_uuid, "expires": expires})


# point 4: a node cannot pin a dataset forever


@pytest_twisted.ensureDeferred
async def test_node_cannot_pin_a_dataset(controls, clients, cluster):
    """curl with a node certificate asking for a lease that never expires, or lasts a
    day, or for another node, gets 403 with the reason; the plugin's 60 s lease works;
    a user still takes any lease."""
    control = controls()
    control.start()
    a, b = cluster.node_uuids
    alice = clients(control)
    await alice.fetch_openapi()
    ds = (await create(alice, a)).json["dataset_id"]
    url = control.url + LEASES
    post = ["-X", "POST", "-H", "Content-Type: application/json", "--data"]
    for body, reason in [(lease_body(ds, a, None), "null"),
                         (lease_body(ds, a, 86400), "86400"),
                         (lease_body(ds, b, 60), "another node")]:
        rc, status, answer = curl(cluster, url, *post, body, certificate=a)
        assert (rc, status) == (0, 403), answer
        assert reason in json.loads(answer)["description"]
    assert (await alice.get(LEASES)).json == []
    rc, status, answer = curl(cluster, url, *post, lease_body(ds, a, 60), certificate=a)
    assert (rc, status) == (0, 201), answer
    node = clients(control, a)
    await node.fetch_openapi()
    assert (await node.post(DATASETS + "/" + ds, {"primary": a})).code == 200
    assert (await node.delete(LEASES + "/" + ds)).code == 200
    r = await alice.post(LEASES, {"dataset_id": ds, "node_uuid": b, "expires": None})
    assert r.code == 201 and r.json["expires"] is None


# point 7: TLS 1.2 with AEAD suites only, TLS 1.3; certificates re-checked


def s_client(cluster, control, *arguments, certificate="alice", port=None, stdin=b""):
    """Run ``openssl s_client`` against the REST API (or ``port``) presenting
    ``certificate``; (exit code, output)."""
    command = ["openssl", "s_client", "-brief",
               "-connect", f"{control.host}:{port or control.port}",
               "-CAfile", str(cluster.path / "cluster.crt"),
               "-cert", str(cluster.path / f"{certificate}.crt"),
               "-key", str(cluster.path / f"{certificate}.key"), *arguments]
    done = subprocess.run(command, input=stdin, capture_output=True, timeout=30)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384",
                                    "ECDHE-ECDSA-AES128-SHA256"])
def test_weak_tls12_suites_refused(controls, cluster, cipher):
    """openssl s_client offering only a CBC suite with TLS 1.2 fails the handshake on the
    REST API, the agent channel and the join port."""
    control = controls()
    control.start()
    for port in (control.port, control.agent_port, control.join_port):
        rc, output = s_client(cluster, control, "-tls1_2", "-cipher", cipher, port=port)
        assert rc != 0, output
        assert "handshake failure" in output or "no cipher" in output, output


@pytest.mark.parametrize("arguments, protocol", [
    (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], "TLSv1.2"),
    (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"], "TLSv1.2"),
    (["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"], "TLSv1.2"),
    (["-tls1_3"], "TLSv1.3"),
])
def test_aead_suites_accepted(controls, cluster, arguments, protocol):
    """openssl s_client with an AEAD suite of TLS 1.2, or TLS 1.3, completes the
    handshake and gets an answer from the REST API."""
    control = controls()
    control.start()
    request = b"GET /v1/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    rc, output = s_client(cluster, control, *arguments, "-ign_eof", stdin=request)
    assert rc == 0, output
    assert f"Protocol version: {protocol}" in output, output
    assert '"flocker"' in output, output


def test_expired_certificate_connection_closed(tmp_path, controls, cluster):
    """A node connection opened with a certificate about to expire is closed by the
    periodic re-check once it has expired (``--tls-recheck``), with a logged reason."""
    now = datetime.now(timezone.utc)
    node = create_node_certificate(cluster.path, tmp_path,
                                   now=now - CERTIFICATE_LIFETIME + timedelta(seconds=4))
    control = controls(extra_arguments=["--tls-recheck", "0.5"])
    control.start()
    command = ["openssl", "s_client", "-brief", "-ign_eof",
               "-connect", f"{control.host}:{control.agent_port}",
               "-CAfile", str(cluster.path / "cluster.crt"),
               "-cert", str(tmp_path / f"{node}.crt"), "-key", str(tmp_path / f"{node}.key")]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        process.wait(timeout=15)  # s_client ends when the server closes the connection
        elapsed = time.monotonic() - started
    finally:
        process.kill()
        process.wait()
    output = process.stdout.read().decode("utf-8", "replace")
    assert "CONNECTION ESTABLISHED" in output, output
    assert elapsed > 2, output
    [event] = control.log_events("pyflock:tls:connection-closed")
    assert f"node-{node}" in event["reason"] and "expired" in event["reason"]


# point 6: HTTP limits


def test_large_bodies_refused_early(tmp_path, controls, cluster):
    """curl sending a 2 MiB body, announced or chunked, gets 413 and the service keeps
    answering; nothing of it is kept."""
    control = controls()
    control.start()
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 * 1024 * 1024))
    url = control.url + DATASETS
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        rc, status, body = curl(cluster, url, "-X", "POST", "-H",
                                "Content-Type: application/json", *extra,
                                "--data-binary", f"@{big}")
        assert status == 413, (rc, body)
        assert "larger than 1048576 bytes" in json.loads(body)["description"]
    assert len(control.log_events("pyflock:control:request-too-large")) == 2
    rc, status, body = curl(cluster, url)
    assert (rc, status, json.loads(body)) == (0, 200, [])


def test_hostile_json_is_bad_input(tmp_path, controls, cluster):
    """curl posting ``[`` x 200,000 or a lone surrogate to the REST API, or ``[`` x
    16,000 to the join port, gets 400, with no traceback in the log."""
    control = controls()
    control.start()
    a = cluster.node_uuids[0]
    attack = tmp_path / "attack.json"
    for raw, reason in [("[" * 200_000, "nested too deeply"),
                        ('{"primary": "%s", "metadata": {"name": "\\ud800"}}' % a,
                         "lone surrogate")]:
        attack.write_text(raw)
        rc, status, body = curl(cluster, control.url + DATASETS, "-X", "POST", "-H",
                                "Content-Type: application/json", "--data-binary",
                                f"@{attack}")
        assert (rc, status) == (0, 400), body
        assert reason in json.loads(body)["description"]
    attack.write_text("[" * 16_000)  # the join port reads at most 16 KiB
    join = f"https://{control.host}:{control.join_port}/v1/join"
    rc, status, body = curl(cluster, join, "-X", "POST", "--data-binary", f"@{attack}",
                            certificate=None)
    assert (rc, status) == (0, 400), body
    assert control.log_events("pyflock:control:request-failed") == []
    assert control.log_events("pyflock:control:join-failed") == []


def closed_within(sock, seconds):
    """Whether the server closes ``sock`` within ``seconds`` (reading what it sends)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_connection_cap(controls, cluster):
    """With ``--max-connections 3``, a 4th idle connection to the REST API or the join
    port is closed at once, and one is accepted again when another closes."""
    control = controls(extra_arguments=["--max-connections", "3"])
    control.start()
    for port in (control.port, control.join_port):
        held = [socket.create_connection((control.host, port)) for _ in range(3)]
        try:
            extra = socket.create_connection((control.host, port))
            assert closed_within(extra, 5)
            extra.close()
            held.pop().close()
            time.sleep(0.5)
            again = socket.create_connection((control.host, port))
            assert not closed_within(again, 0.5)
            again.close()
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)
    assert control.log_events("pyflock:tls:connections-full")
    rc, status, _ = curl(cluster, control.url + DATASETS)
    assert (rc, status) == (0, 200)


def test_handshake_timeout(controls, cluster):
    """A client that connects and never speaks TLS is dropped after
    ``--tls-handshake-timeout`` seconds, on the REST API, the agent channel and the join
    port."""
    control = controls(extra_arguments=["--tls-handshake-timeout", "1"])
    control.start()
    for port in (control.port, control.agent_port, control.join_port):
        sock = socket.create_connection((control.host, port))
        try:
            started = time.monotonic()
            assert closed_within(sock, 10)
            assert 0.8 < time.monotonic() - started < 5
        finally:
            sock.close()
    assert len(control.log_events("pyflock:tls:handshake-timeout")) == 3


# point 10: one node cannot exhaust the cluster


@pytest_twisted.ensureDeferred
async def test_node_flood_is_limited(controls, clients, cluster):
    """A node certificate firing 60 creates at once gets 429 with Retry-After past its
    burst, and 403 past its dataset quota; a user is served meanwhile; every write is
    logged naming its certificate."""
    control = controls(extra_arguments=["--node-write-rate", "2", "--node-write-burst",
                                        "20", "--node-dataset-quota", "12"])
    control.start()
    a, b = cluster.node_uuids
    node = clients(control, a)
    alice = clients(control)
    await node.fetch_openapi()
    await alice.fetch_openapi()
    started = time.monotonic()
    answers = await gatherResults([
        Deferred.fromCoroutine(node.post(DATASETS, {"primary": a})) for _ in range(60)])
    elapsed = time.monotonic() - started
    codes = [r.code for r in answers]
    assert codes.count(201) == 12, codes
    assert codes.count(403) + 12 <= 20 + 2 * elapsed + 1, codes
    limited = [r for r in answers if r.code == 429]
    assert len(limited) >= 60 - 20 - 2 * elapsed - 1, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert all("quota" in r.json["description"] for r in answers if r.code == 403)
    for _ in range(30):
        assert (await create(alice, a)).code == 201
    listed = await alice.get(DATASETS)
    assert len(listed.json) == 42
    created = control.log_events("pyflock:control:dataset-created")
    by = {}
    for event in created:
        by[event["certificate"]] = by.get(event["certificate"], 0) + 1
    assert by == {f"node-{a}": 12, "user-alice": 30}


# point 11: CLI output is safe


def test_cli_shows_hostile_names_harmlessly(tmp_path, controls, cluster):
    """A node certificate names a dataset with terminal escapes, a newline and a
    bidirectional override (curl); the real ``pyflock list`` shows them escaped, one line
    per dataset, and ``list --json`` keeps them exact."""
    control = controls()
    control.start()
    a = cluster.node_uuids[0]
    hostile = "\x1b]0;owned\x07\x1b[2Jx\nFAKE  ROW\u202etxt"
    body = tmp_path / "hostile.json"
    body.write_text(json.dumps({"primary": a, "metadata": {"name": hostile, "k\x1b": "v"}}))
    rc, status, answer = curl(cluster, control.url + DATASETS, "-X", "POST", "-H",
                              "Content-Type: application/json", "--data-binary",
                              f"@{body}", certificate=a)
    assert (rc, status) == (0, 201), answer
    command = [script_path("pyflock"), "--control-service", control.host,
               "--control-port", str(control.port), "--certs-path", str(cluster.path),
               "--user", "alice", "list"]
    shown = subprocess.run(command, capture_output=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout.decode("utf-8")
    assert out.count("\n") == 2, out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2Jx\\x0aFAKE  ROW\\u202etxt" in out
    listed = subprocess.run(command + ["--json"], capture_output=True, timeout=60)
    assert json.loads(listed.stdout)[0]["metadata"]["name"] == hostile
