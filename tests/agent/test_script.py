"""
Tests for ``pyflock-agent``'s wiring: its command line (``--config`` before or after the
subcommand) and ``running_volume_mounts``, which says None only when dockerd does not
answer and lets bugs through.
"""

import json

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent import _script
from pyflock.agent._script import DEFAULT_CONFIG, _parser, main, running_volume_mounts
from pyflock.common._logging import events_of


class ParserTests(SynchronousTestCase):
    """``--config`` counts wherever it is given."""

    def test_before_subcommand(self):
        """``--config FILE release`` reads FILE, not the default."""
        options = _parser().parse_args(["--config", "/tmp/mine.yml", "release"])
        self.assertEqual((options.command, options.config), ("release", "/tmp/mine.yml"))

    def test_after_subcommand(self):
        """``release --config FILE`` reads FILE."""
        options = _parser().parse_args(["release", "--config", "/tmp/mine.yml"])
        self.assertEqual((options.command, options.config), ("release", "/tmp/mine.yml"))

    def test_default(self):
        """Without ``--config`` the default file is read, with or without a subcommand."""
        self.assertEqual([_parser().parse_args(argv).config for argv in ([], ["era"])],
                         [DEFAULT_CONFIG, DEFAULT_CONFIG])


def test_main_reads_config_given_before_subcommand(tmp_path, capsys):
    """``pyflock-agent --config FILE era`` fails on FILE's problem, naming FILE."""
    path = tmp_path / "agent.yml"
    path.write_text("not: [a valid agent configuration\n")
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(path), "era"])
    assert exit.value.code == 1
    error = capsys.readouterr().err
    assert str(path) in error and DEFAULT_CONFIG not in error


class _Response:
    """What ``treq.get`` answers: a status code and a body."""

    def __init__(self, code, body):
        self.code = code
        self._body = body

    def content(self):
        """The body, at once."""
        return succeed(self._body)


class RunningVolumeMountsTests(SynchronousTestCase):
    """Only dockerd not answering makes ``running_volume_mounts`` None."""

    def mounts(self, answer):
        """The Deferred of ``running_volume_mounts`` with ``treq.get`` giving ``answer``."""
        self.patch(_script.treq, "get", lambda *a, **kw: answer)
        return Deferred.fromCoroutine(
            running_volume_mounts(MemoryReactorClock(), "/run/docker.sock"))

    def test_counts(self):
        """A container list gives the mount points per pyflock volume."""
        containers = [{"Mounts": [{"Type": "volume", "Driver": "pyflock", "Name": "v"}]}]
        answer = succeed(_Response(200, json.dumps(containers).encode()))
        self.assertEqual(self.successResultOf(self.mounts(answer)), {"v": 1})

    def test_refused(self):
        """A dockerd that refuses the connection gives None, logged."""
        with capturedLogs() as events:
            result = self.successResultOf(self.mounts(fail(ConnectionRefusedError())))
        self.assertIsNone(result)
        [event] = events_of(events, "pyflock:agent:dockerd-unanswered")
        self.assertEqual(event["socket"], "/run/docker.sock")

    def test_error_answer(self):
        """An HTTP error from dockerd gives None."""
        self.assertIsNone(self.successResultOf(self.mounts(succeed(_Response(500, b"")))))

    def test_not_json(self):
        """A body that is not JSON gives None."""
        self.assertIsNone(self.successResultOf(self.mounts(succeed(_Response(200, b"{")))))

    def test_bug_propagates(self):
        """An exception that is no failure to answer (a bug) is not swallowed."""
        def broken(containers):
            raise TypeError("a bug")
        self.patch(_script, "docker_volume_mounts", broken)
        failure = self.failureResultOf(self.mounts(succeed(_Response(200, b"[]"))))
        failure.trap(TypeError)


def test_make_backend_ebs(tmp_path):
    """``dataset: {backend: ebs}`` makes an ebs backend of the certificate's cluster and the
    file's options, without a network call (the instance is looked up on first use)."""
    from pyflock.agent._backends._ebs import EBSBackend
    from pyflock.agent._config import parse_config
    from tests.harness.certificates import make_cluster_certificates
    certificates = make_cluster_certificates(tmp_path, nodes=1)
    node_uuid = certificates.node_uuids[0]
    config = parse_config({
        "version": 1, "control-service": {"hostname": "control.example"},
        "certificates": str(certificates.node_directory(node_uuid)),
        "dataset": {"backend": "ebs", "region": "eu-west-1", "device_folder": "/tmp/dev",
                    "default_size": "2G"}})
    backend = _script.make_backend(config, node_uuid)
    assert isinstance(backend, EBSBackend)
    assert (backend.cluster_id, backend.node_uuid, backend.options.region,
            backend.options.device_folder, backend.options.default_size) == (
        certificates.cluster_uuid, node_uuid, "eu-west-1", "/tmp/dev", 2 * 1024 ** 3)


def test_local_address_towards():
    """The address connections to a loopback host leave from is that loopback address."""
    from pyflock.agent._script import local_address_towards
    assert local_address_towards("127.0.0.1", 4524) == "127.0.0.1"
