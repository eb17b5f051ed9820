"""
An in-memory client endpoint for tests and benchmarks that feed a protocol by hand (an
agent channel given frames one by one, say).
"""

from twisted.internet.defer import succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class StringEndpoint:
    """Connects each client to a new ``StringTransport``; ``protocol`` is the latest."""

    protocol = None

    def connect(self, factory):
        """Build the client's protocol over a ``StringTransport``, connected at once."""
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(StringTransport())
        return succeed(self.protocol)
