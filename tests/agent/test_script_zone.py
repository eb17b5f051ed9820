"""
The agent reports its backend's availability zone: ``backend_zone`` asks backends that
have one (ebs), and a backend that cannot tell stops the start with a clear error.
"""

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends import BackendError
from pyflock.agent._backends._memory import MemoryBackend, MemoryBlockStore
from pyflock.agent._script import StartupError, backend_zone


class _Zoned:
    """A backend with an availability zone (as the ebs backend has)."""

    def __init__(self, zone=None, error=None):
        self.zone, self.error = zone, error

    def availability_zone(self):
        """The zone, or the error given."""
        if self.error is not None:
            raise self.error
        return self.zone


def _now(f, *args):
    return maybeDeferred(f, *args)


class BackendZoneTests(SynchronousTestCase):
    """``backend_zone`` on backends with and without zones."""

    def zone(self, backend):
        """What ``backend_zone`` gives for ``backend`` (run at once)."""
        return Deferred.fromCoroutine(backend_zone(backend, _now))

    def test_zone_of_a_zoned_backend(self):
        """A backend's zone is what the agent reports."""
        self.assertEqual("eu-west-1a", self.successResultOf(self.zone(_Zoned("eu-west-1a"))))

    def test_no_zone_for_other_backends(self):
        """Backends without zones (loopback, memory) report none."""
        self.assertIsNone(self.successResultOf(self.zone(MemoryBackend(MemoryBlockStore(), "n"))))

    def test_backend_that_cannot_tell_stops_the_start(self):
        """A backend error (no metadata service) is a ``StartupError`` with its text."""
        failure = self.failureResultOf(self.zone(_Zoned(error=BackendError("no IMDS here"))),
                                       StartupError)
        self.assertEqual("no IMDS here", str(failure.value))


def test_ebs_backend_zone_is_its_instances():
    """The ebs backend's zone is its instance's, as the metadata service gave it."""
    from pyflock.agent._backends._ebs import EBSBackend, InstanceIdentity
    backend = EBSBackend("cluster", "node", identity=InstanceIdentity(
        "i-0123", "eu-west-1a", "eu-west-1"), client=object())
    assert backend.availability_zone() == "eu-west-1a"
