"""
deploy/systemd/: the units pass ``systemd-analyze verify`` in a root where pyflock is
installed at the paths they name (stubs), and fail it where it is not; they restart on
failure, the agent starts before dockerd, stopping the agent unmounts nothing, and both
may open more files than the control service's connection cap.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.requirements import require_commands

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
NAMES = ("pyflock-control", "pyflock-agent")

#: The control service's default cap on open connections (issue 8).
CONNECTION_CAP = 1000

#: Where systemd's own units are, copied into the test root (sysinit.target and others).
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def unit(name: str) -> configparser.ConfigParser:
    """The unit file ``name`` as sections of keys (repeated keys: the last one)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((UNITS / f"{name}.service").read_text())
    return parser


def test_both_restart_on_failure_with_enough_files():
    """Both services restart on failure and may open far more files than the control
    service's connection cap."""
    for name in NAMES:
        service = unit(name)["Service"]
        assert service["Restart"] == "on-failure"
        assert int(service["LimitNOFILE"]) > 10 * CONNECTION_CAP
        assert service["ExecStart"].startswith(f"/opt/pyflock/bin/{name} run ")


def test_agent_starts_before_docker_and_leaves_mounts():
    """The agent starts before dockerd; stopping it signals the agent alone and runs no
    ExecStop, and the unit has no mount namespace of its own, so its mounts outlive it."""
    agent = unit("pyflock-agent")
    assert agent["Unit"]["Before"] == "docker.service"
    service = agent["Service"]
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    for key in ("ExecStop", "ExecStopPost", "PrivateMounts", "PrivateTmp", "ProtectSystem",
                "ProtectHome", "MountFlags", "TemporaryFileSystem"):
        assert key not in service, key


def stub_root(tmp_path: Path, installed: tuple[str, ...] = NAMES) -> Path:
    """A root folder with systemd's units, ours, and executable stubs for ``installed``."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(UNITS / f"{name}.service", units)
    binaries = root / "opt" / "pyflock" / "bin"
    binaries.mkdir(parents=True)
    for name in installed:
        (binaries / name).write_text("#!/bin/sh\n")
        (binaries / name).chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` of both units inside ``root``."""
    return subprocess.run(
        ["systemd-analyze", f"--root={root}", "verify",
         *(f"/etc/systemd/system/{name}.service" for name in NAMES)],
        capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_units_pass_systemd_analyze_verify(tmp_path):
    """Where pyflock is installed at /opt/pyflock, both units verify without a word."""
    require_commands("systemd-analyze")
    if not SYSTEM_UNITS.is_dir():
        pytest.fail(f"systemd-analyze is installed but {SYSTEM_UNITS} is not")
    result = verify(stub_root(tmp_path))
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.integration
def test_verify_fails_without_pyflock(tmp_path):
    """Where the agent is not installed at the path its unit names, verify says so."""
    require_commands("systemd-analyze")
    result = verify(stub_root(tmp_path, installed=("pyflock-control",)))
    assert result.returncode != 0
    assert "/opt/pyflock/bin/pyflock-agent is not executable" in result.stderr
