"""
The control service passes the cluster's revocation list to agents (issue 8, point 5):
agents of protocol 3 get it after the welcome and snapshot and whenever a new list is
published; agents of protocol 2 never do; no list, nothing sent.
"""

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pyflock.common._model import Dataset
from pyflock.common._logging import events_of
from pyflock.common._wire import CRLUpdate, Snapshot, Welcome
from pyflock.control import _agentchannel
from pyflock.control.testing import NODE_A, NODE_B
from tests.control.test_agentchannel import RawAgent
from tests.control import test_agentchannel_versions as versions

PEM = "-----BEGIN X509 CRL-----\nMIIB\n-----END X509 CRL-----\n"
NEWER = "-----BEGIN X509 CRL-----\nMIIC\n-----END X509 CRL-----\n"


def kinds(messages) -> list:
    """The types of ``messages``, in order."""
    return [type(m) for m in messages]


class CRLPublishingTests(SynchronousTestCase):
    """``AgentChannelServer.publish_crl`` with agents of both versions, on a Clock."""

    # A started server on an in-memory harness (``self.h``), stopped after.
    setUp = versions.NegotiationTests.setUp

    def agent(self, identity=NODE_A, protocols=(2, 3)):
        """A connection of ``identity`` that said hello speaking ``protocols``; the
        messages it got."""
        agent = RawAgent(self.server, identity)
        return agent, agent.hello(protocols=protocols)

    def test_sent_after_the_welcome_and_snapshot(self):
        """A list published before an agent of version 3 connects follows its snapshot."""
        self.server.publish_crl(PEM)
        agent, messages = self.agent()
        self.assertEqual(kinds(messages), [Welcome, Snapshot, CRLUpdate])
        self.assertEqual(messages[-1], CRLUpdate(crl=PEM))

    def test_follows_every_page_of_a_paged_snapshot(self):
        """With a snapshot in pages, the list comes after the last page."""
        self.server.page_size = 600
        ids = [f"{number:08x}-0000-4000-8000-000000000000" for number in range(8)]

        def create(config):
            for dataset_id in ids:
                config = config.create(Dataset(dataset_id=dataset_id,
                                               primary=NODE_A.node_uuid,
                                               metadata={"name": dataset_id[:8]}))
            return config
        self.successResultOf(self.h.configuration.change(ids, create))
        self.h.clock.advance(0)
        self.server.publish_crl(PEM)
        agent, messages = self.agent()
        self.assertGreater(kinds(messages).count(Snapshot), 2)
        self.assertEqual(kinds(messages)[-1], CRLUpdate)
        self.assertFalse(messages[-2].more)

    def test_new_list_pushed_to_connected_agents(self):
        """A new list goes to every connected agent of version 3 at once, only once."""
        a, _ = self.agent(NODE_A)
        b = RawAgent(self.server, NODE_B, host="127.0.0.8")
        b.hello()
        a.received()
        self.server.publish_crl(PEM)
        self.assertEqual(a.received(), [CRLUpdate(crl=PEM)])
        self.assertEqual(b.received(), [CRLUpdate(crl=PEM)])
        self.server.publish_crl(PEM)
        self.assertEqual(a.received(), [])
        self.server.publish_crl(NEWER)
        self.assertEqual(a.received(), [CRLUpdate(crl=NEWER)])

    def test_no_list_sends_nothing(self):
        """Without a list (never published, or None), agents get no message."""
        agent, messages = self.agent()
        self.assertEqual(kinds(messages), [Welcome, Snapshot])
        self.server.publish_crl(PEM)
        agent.received()
        self.server.publish_crl(None)
        self.assertEqual(agent.received(), [])
        later = RawAgent(self.server, NODE_B, host="127.0.0.8")
        self.assertNotIn(CRLUpdate, kinds(later.hello()))

    def test_reconnecting_agent_with_current_view_still_gets_it(self):
        """An agent whose view is current gets no snapshot, but gets the list."""
        self.server.publish_crl(PEM)
        agent, _ = self.agent()
        agent.lose()
        again = RawAgent(self.server, NODE_A)
        messages = again.hello(known=self.server.current)
        self.assertEqual(kinds(messages), [Welcome, CRLUpdate])

    def test_list_over_the_frame_limit_is_not_sent(self):
        """A list over the agents' frame limit is logged as an error and not sent."""
        self.patch(_agentchannel, "MAX_MESSAGE", 50)
        agent, _ = self.agent()
        with capturedLogs() as events:
            self.server.publish_crl(PEM)
        self.assertEqual(agent.received(), [])
        [error] = events_of(events, "pyflock:control:crl-too-large")
        self.assertEqual(error["limit"], 50)
