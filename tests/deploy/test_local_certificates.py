"""
``make up``'s certificates (deploy/local/certificates.sh, run by up.sh) keep keys apart
(issue 8, point 9): the CA key in a folder of its own, the admin user's in the CLI's, none
in the control service's; a state folder of an earlier ``make up`` is moved to that
layout. The files are made by the real ``pyflock-ca``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pyflock.common._ca import (
    CertificateIndex, create_api_certificate, create_control_certificate, initialize,
    load_signing_authority,
)
from tests.harness.control import ControlProcess, read_events
from tests.harness.requirements import require_commands

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "certificates.sh"
BIN = os.path.dirname(sys.executable)


def _run(state: Path) -> subprocess.CompletedProcess:
    """Run the script on ``state``; it must succeed."""
    done = subprocess.run([str(SCRIPT), str(state), BIN], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _files(folder: Path) -> list[str]:
    """The names in ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


def test_shellcheck_finds_nothing():
    """shellcheck reports nothing on the certificates script and up.sh, which runs it."""
    require_commands("shellcheck")
    result = subprocess.run(["shellcheck", str(SCRIPT), str(SCRIPT.parent / "up.sh")],
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "")


def test_keys_apart(tmp_path):
    """The CA key only in ca/, the admin key only in cli/, the control's only in certs/;
    every folder 0700 and every key 0600; a second run changes nothing."""
    state = tmp_path / "state"
    first = _run(state)
    assert _files(state / "ca") == ["cluster.crt", "cluster.key", "issued.jsonl"]
    assert _files(state / "certs") == [
        "cluster.crt", "control-service.crt", "control-service.key"]
    assert _files(state / "cli") == ["admin.crt", "admin.key", "cluster.crt"]
    assert _files(state / "node" / "certs") == ["cluster.crt", "node.crt", "node.key"]
    for folder in (state, state / "ca", state / "certs", state / "cli", state / "node/certs"):
        assert _mode(folder) == 0o700, folder
    keys = list(state.rglob("*.key"))
    assert len(keys) == 4 and all(_mode(key) == 0o600 for key in keys)
    # The CA in ca/ issued them all, and its index says so.
    authority = load_signing_authority(state / "ca/cluster.crt", state / "ca/cluster.key")
    assert sorted(e.common_name.split("-")[0] for e in authority.index.entries()) == [
        "control", "node", "user"]
    assert "created a cluster CA in" in first.stdout
    second = _run(state)
    assert second.stdout == ""
    assert _files(state / "ca") == ["cluster.crt", "cluster.key", "issued.jsonl"]


def test_earlier_layout_is_moved(tmp_path):
    """A state folder whose certs/ held the CA and admin keys gets them moved out, with the
    same CA (nothing issued again but the node's certificate)."""
    state = tmp_path / "state"
    certs = state / "certs"
    certs.mkdir(parents=True)
    initialize(certs, "local")
    control = create_control_certificate(certs, certs, "127.0.0.1")
    control.certificate_path.rename(certs / "control-service.crt")
    control.key_path.rename(certs / "control-service.key")
    create_api_certificate(certs, certs, "admin")
    before = (certs / "cluster.crt").read_bytes()
    done = _run(state)
    assert "moved the CA key to" in done.stdout
    assert _files(certs) == ["cluster.crt", "control-service.crt", "control-service.key"]
    assert _files(state / "ca") == ["cluster.crt", "cluster.key", "issued.jsonl"]
    assert _files(state / "cli") == ["admin.crt", "admin.key", "cluster.crt"]
    assert (state / "ca/cluster.crt").read_bytes() == before
    assert len(CertificateIndex(state / "ca/issued.jsonl").entries()) == 3


def test_control_service_runs_on_the_layout(tmp_path):
    """The control service runs on certs/ (no CA key) and serves joins with
    ``--ca-key ca/cluster.key``, with no warning; given none, it would warn about a key in
    its certificates folder."""
    state = tmp_path / "state"
    _run(state)
    control = ControlProcess(state / "control", state / "certs", host="127.0.0.1",
                             extra_arguments=["--ca-key", str(state / "ca/cluster.key")])
    try:
        control.start()
        [joins] = read_events(control.log_path, "pyflock:control:joins-on")
        assert joins["index"] == str(state / "ca/issued.jsonl")
        assert read_events(control.log_path, "pyflock:control:ca-key-beside-certificates") == []
    finally:
        control.close()
    (state / "certs/cluster.key").write_bytes((state / "ca/cluster.key").read_bytes())
    beside = ControlProcess(state / "control", state / "certs", host="127.0.0.1")
    try:
        beside.start()
        [warning] = read_events(beside.log_path, "pyflock:control:ca-key-beside-certificates")
        assert warning["ca_key"] == str(state / "certs/cluster.key")
    finally:
        beside.close()
