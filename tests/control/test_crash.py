"""
kill -9 of the control service while clients change the configuration: every change it
acknowledged is there after a restart on the same data path.
"""

import json
import random
from uuid import uuid4

import attr
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from tests.harness.certificates import make_cluster_certificates
from tests.harness.control import APIClient, ControlProcess, free_address

pytestmark = pytest.mark.integration

DATASETS = "/v1/configuration/datasets"

#: Concurrent clients, and the changes each makes per round at most.
CLIENTS = 8
CHANGES = 30

#: The service is killed once this many changes of the round were acknowledged.
KILL_POINTS = (1, 60, 170)


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs."""
    from twisted.internet import reactor
    return reactor


@attr.s(auto_attribs=True)
class Expectations:
    """
    What the store must hold after a crash. A change is acknowledged when its 200/201
    status arrived; it was durable before it was sent. Each client has at most one request
    in flight and moves only its own datasets, so after a restart a dataset's primary is
    the last acknowledged one or the target of the request that was in flight for it,
    never an older or another one; a dataset whose create was in flight may or may not
    exist, with the primary it was created with.
    """

    #: dataset id -> the primaries it may have; it must exist.
    acknowledged: dict = attr.ib(factory=dict)
    #: dataset id -> the primary it may have, if it exists at all.
    uncertain: dict = attr.ib(factory=dict)

    def check(self, listing: list) -> None:
        """Assert that ``listing`` holds every acknowledged change and nothing else."""
        found = {d["dataset_id"]: d["primary"] for d in listing}
        missing = set(self.acknowledged) - set(found)
        assert not missing, f"acknowledged datasets lost: {sorted(missing)}"
        for dataset_id, primaries in self.acknowledged.items():
            assert found[dataset_id] in primaries, (dataset_id, found[dataset_id], primaries)
        unknown = set(found) - set(self.acknowledged) - set(self.uncertain)
        assert not unknown, f"datasets nobody created: {sorted(unknown)}"
        for dataset_id in set(found) & set(self.uncertain):
            assert found[dataset_id] == self.uncertain[dataset_id]
        # What the restarted service holds is durable: the next round starts from it.
        self.acknowledged = {k: {v} for k, v in found.items()}
        self.uncertain = {}


@attr.s(auto_attribs=True)
class Round:
    """One round of concurrent changes, ended by kill -9 after ``kill_after`` acks."""

    control: ControlProcess
    expectations: Expectations
    kill_after: int
    acks: int = 0
    killed: bool = False

    def acknowledged(self, dataset_id: str, primary: str) -> None:
        """Record an acknowledged change; kill the service at the chosen point."""
        self.expectations.acknowledged[dataset_id] = {primary}
        self.expectations.uncertain.pop(dataset_id, None)
        self.acks += 1
        if self.acks >= self.kill_after and not self.killed:
            self.killed = True
            self.control.kill9()

    def unanswered(self, dataset_id: str, primary: str, move: bool) -> None:
        """Record a change that got no answer: it may or may not have been made."""
        if move:
            self.expectations.acknowledged[dataset_id].add(primary)
        else:
            self.expectations.uncertain[dataset_id] = primary


async def change(client: APIClient, crash: Round, rng: random.Random, mine: list) -> None:
    """Create datasets and move them around until the service dies or CHANGES are done."""
    for number in range(CHANGES):
        primary = str(uuid4())
        if not mine or number % 3 == 0:
            dataset_id, move, path = str(uuid4()), False, DATASETS
            body = {"dataset_id": dataset_id, "primary": primary}
        else:
            dataset_id, move = rng.choice(mine), True
            path, body = f"{DATASETS}/{dataset_id}", {"primary": primary}
        try:
            response = await client.http.post(
                client.url + path, data=json.dumps(body).encode(),
                headers={"content-type": "application/json"}, timeout=30)
        except Exception:
            if not crash.killed:
                raise
            crash.unanswered(dataset_id, primary, move)
            return
        assert response.code == (200 if move else 201), response.code
        crash.acknowledged(dataset_id, primary)
        if not move:
            mine.append(dataset_id)
        try:
            await response.content()
        except Exception:
            # The status was sent after the change was durable; the body may be cut off.
            if not crash.killed:
                raise
        if crash.killed:
            return


@pytest_twisted.ensureDeferred
async def test_acknowledged_changes_survive_kill_9(reactor, tmp_path):
    """Every create and move acknowledged before a kill -9 is there after the restart."""
    certificates = tmp_path / "certs"
    certificates.mkdir()
    cluster = make_cluster_certificates(certificates, nodes=0, users=("alice",),
                                        control_host=free_address()[0])
    expectations = Expectations()
    rng = random.Random(9)
    mine = [[] for _ in range(CLIENTS)]
    with ControlProcess(tmp_path / "data", cluster.path, host=cluster.control_host,
                        log_directory=tmp_path / "logs") as control:
        control.start()
        for kill_after in KILL_POINTS:
            crash = Round(control, expectations, kill_after)
            clients = [APIClient(reactor, control.url, cluster.path, "alice")
                       for _ in range(CLIENTS)]
            try:
                await gatherResults(
                    [Deferred.fromCoroutine(change(client, crash, rng, datasets))
                     for client, datasets in zip(clients, mine)], consumeErrors=True)
            finally:
                for client in clients:
                    await client.close()
            assert crash.killed and control.returncode == -9
            control.start()
            check = APIClient(reactor, control.url, cluster.path, "alice")
            try:
                listing = await check.get(DATASETS)
            finally:
                await check.close()
            expectations.check(listing.json)
        assert control.stop() == 0
