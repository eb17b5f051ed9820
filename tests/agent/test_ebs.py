"""
Tests for the ebs backend on the fake EC2 of ``tests.harness.fake_ec2`` (as root: its
volumes really attach as loop devices): the conformance suite, and what EBS adds: tags,
zones, device names, the attachment limit, throttling, eventual consistency, credentials.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends._ebs import (
    EBSBackend, EBSOptions, FilesystemDamaged, WrongZone, read_instance_identity,
)
from pyflock.agent._backends._ebs_model import (
    TAG_CLUSTER, TAG_DATASET, TAG_FSCK, TAG_INSTANCE, TAG_NODE, AttachmentLimitReached,
    WaitLimits,
)
from pyflock.agent._fs import has_filesystem, make_filesystem, run_command
from pyflock.agent._backends._interface import GiB, AlreadyAttached, VolumeBusy
from tests.contracts.backends import (
    NODE_A, NODE_B, BackendHarness, hold_in_namespace, make_iblockdevicebackend_tests,
)
from tests.harness.fake_ec2 import FakeEC2, FakeSettings
from tests.harness.requirements import require_commands, require_root

#: Waits short enough for tests, long enough for the fake's delays.
QUICK = WaitLimits(created=10.0, attached=10.0, detached=1.0, deleted=10.0, device=2.0,
                   interval=0.02)

CLUSTER = "7d1b6f0e-3c55-4d2e-9a57-0f1e2d3c4b5a"


def start_fake(test_case: SynchronousTestCase, settings: FakeSettings = None) -> FakeEC2:
    """A started fake EC2, closed at cleanup (its loop devices detached); needs root."""
    require_root()
    require_commands("losetup", "mkfs.ext4", "unshare")
    fake = FakeEC2(settings).start()
    test_case.addCleanup(fake.close)
    return fake


def backend_on(fake: FakeEC2, node_uuid: str, instance_id: str, **options) -> EBSBackend:
    """An ebs backend for ``node_uuid`` on the fake's ``instance_id``."""
    return EBSBackend(CLUSTER, node_uuid, EBSOptions(
        endpoint_url=fake.url, metadata_url=fake.metadata_url(instance_id),
        device_folder=fake.device_folder, limits=options.pop("limits", QUICK), **options))


def ebs_harness(test_case: SynchronousTestCase) -> BackendHarness:
    """A harness over ebs backends of two instances of one fake EC2 (needs root)."""
    fake = start_fake(test_case)
    instances = {NODE_A: fake.add_instance(), NODE_B: fake.add_instance()}
    holders = []

    def hold(backend, dataset_id):
        mount_point = os.path.join(fake.root, "holders", str(len(holders)))
        holders.append(mount_point)
        return hold_in_namespace(test_case, backend.get_device_path(dataset_id), mount_point)

    return BackendHarness(backend_for=lambda node: backend_on(fake, node, instances[node]),
                          hold=hold, lose_devices=fake.lose_devices, real_devices=True,
                          size=GiB)


@pytest.mark.integration
class EBSBackendConformanceTests(make_iblockdevicebackend_tests(ebs_harness)):
    """The ebs backend on the fake EC2 passes the ``IBlockDeviceBackend`` suite."""


@pytest.mark.integration
class EBSBackendTests(SynchronousTestCase):
    """What is particular to EBS, on the fake EC2."""

    def setUp(self) -> None:
        self.fake = start_fake(self)
        self.instance = self.fake.add_instance()
        self.a = backend_on(self.fake, NODE_A, self.instance)

    def test_metadata_identity(self) -> None:
        """The instance id, zone and region come from the metadata service (IMDSv2)."""
        identity = read_instance_identity(self.fake.metadata_url(self.instance))
        self.assertEqual((self.instance, "us-east-1a", "us-east-1"),
                         (identity.instance_id, identity.zone, identity.region))
        self.assertEqual(1, len(self.fake.tokens))

    def test_instance_role_credentials_only(self) -> None:
        """Requests are signed with the instance role's credentials from the metadata
        service, even when the environment and a credentials file offer others."""
        credentials = os.path.join(self.fake.root, "credentials")
        with open(credentials, "w") as f:
            f.write("[default]\naws_access_key_id = AKIAFILE\naws_secret_access_key = x\n")
        self.patch(os, "environ", dict(os.environ, AWS_ACCESS_KEY_ID="AKIAENV",
                                       AWS_SECRET_ACCESS_KEY="x",
                                       AWS_SHARED_CREDENTIALS_FILE=credentials))
        self.a.list_volumes()
        self.assertEqual({"ASIAFAKE"}, self.fake.access_keys)

    def test_tags_are_the_truth(self) -> None:
        """A volume carries the cluster and dataset tags, and the node's while attached;
        another backend object with no memory of it sees the same."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        attached = self.a.attach_volume(dataset_id, NODE_A)
        [volume] = self.fake.volumes.values()
        self.assertEqual({TAG_CLUSTER: CLUSTER, TAG_DATASET: dataset_id, TAG_NODE: NODE_A,
                          TAG_INSTANCE: self.instance, "Name": f"pyflock-{dataset_id}"},
                         volume.tags)
        self.assertEqual([attached],
                         backend_on(self.fake, NODE_A, self.instance).list_volumes())
        self.a.detach_volume(dataset_id)
        self.assertNotIn(TAG_NODE, volume.tags)

    def test_late_tag_cleanup_keeps_new_holder(self) -> None:
        """The old node's tag clean-up, late after its detach (EC2 says available before
        it ends), leaves the tags of a node that attached the volume meanwhile."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        self.a.attach_volume(dataset_id, NODE_A)
        [described] = self.a.client.describe_volumes()["Volumes"]
        self.a.detach_volume(dataset_id)
        b = backend_on(self.fake, NODE_B, self.fake.add_instance())
        attached = b.attach_volume(dataset_id, NODE_B)
        self.a._forget_node(described)  # what the old node's detach does last
        self.assertEqual([attached], self.a.list_volumes())

    def test_other_cluster_invisible(self) -> None:
        """Volumes of another cluster are not listed."""
        self.a.create_volume(str(uuid.uuid4()), GiB)
        other = EBSBackend(str(uuid.uuid4()), NODE_A, self.a.options)
        self.assertEqual([], other.list_volumes())

    def test_created_encrypted_in_zone(self) -> None:
        """Volumes are made encrypted, in the node's zone, as whole GiB, with a token."""
        self.a.create_volume(str(uuid.uuid4()), GiB + 1)
        [volume] = self.fake.volumes.values()
        self.assertEqual(("us-east-1a", 2, "true", "gp3"),
                         (volume.zone, volume.size, volume.parameters["Encrypted"],
                          volume.parameters["VolumeType"]))
        [create] = [r for r in self.fake.requests if r["Action"] == "CreateVolume"]
        self.assertTrue(create["ClientToken"].startswith("pyflock-"))

    def test_device_found_by_id(self) -> None:
        """The device is the volume's by-id link, a block device of the volume's size."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        device = self.a.attach_volume(dataset_id, NODE_A).device_path
        [volume] = self.fake.volumes.values()
        self.assertEqual(os.path.join(self.fake.device_folder, "disk", "by-id",
                                      "nvme-Amazon_Elastic_Block_Store_"
                                      + volume.volume_id.replace("-", "")), device)
        self.assertEqual(volume.attachment.loop, os.path.realpath(device))

    def test_zone_mismatch(self) -> None:
        """A volume of another zone is refused with both zones named."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        far = backend_on(self.fake, NODE_B, self.fake.add_instance("us-east-1b"))
        e = self.assertRaises(WrongZone, far.attach_volume, dataset_id, NODE_B)
        self.assertIn("us-east-1a", str(e))
        self.assertIn("us-east-1b", str(e))

    def test_attachment_limit(self) -> None:
        """Past the instance's attachment limit, an attach is refused with a clear error."""
        a = backend_on(self.fake, NODE_A, self.instance, attachment_limit=3)
        ids = [str(uuid.uuid4()) for _ in range(3)]
        for dataset_id in ids:
            a.create_volume(dataset_id, GiB)
        a.attach_volume(ids[0], NODE_A)
        a.attach_volume(ids[1], NODE_A)
        e = self.assertRaises(AttachmentLimitReached, a.attach_volume, ids[2], NODE_A)
        self.assertIn("limit", str(e))

    def test_concurrent_attaches_distinct_names(self) -> None:
        """Attaches from several threads at once on one instance get distinct names."""
        ids = [str(uuid.uuid4()) for _ in range(4)]
        for dataset_id in ids:
            self.a.create_volume(dataset_id, GiB)
        errors = []

        def attach(dataset_id):
            try:
                self.a.attach_volume(dataset_id, NODE_A)
            except Exception as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=attach, args=(i,)) for i in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([], errors)
        names = [r["Device"] for r in self.fake.requests if r["Action"] == "AttachVolume"]
        self.assertEqual(len(names), len(set(names)))

    def test_throttling_retried(self) -> None:
        """Throttled calls (every third request) are retried by botocore, not fatal."""
        self.fake.settings.throttle_every = 3
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        self.a.attach_volume(dataset_id, NODE_A)
        self.a.detach_volume(dataset_id)
        self.a.destroy_volume(dataset_id)
        self.assertEqual([], self.a.list_volumes())

    def test_eventual_consistency(self) -> None:
        """A volume not yet described after creation, and attaches and detaches reported
        late, are waited for, not fatal."""
        self.fake.settings.visibility_delay = 0.3
        self.fake.settings.report_delay = 0.3
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        self.assertEqual(NODE_A, self.a.attach_volume(dataset_id, NODE_A).attached_to)
        self.a.detach_volume(dataset_id)
        self.assertIsNone(self.a.get_volume(dataset_id).attached_to)

    def test_busy_detach_stays_detaching(self) -> None:
        """A detach of a held device stays ``detaching`` in EC2 and raises ``VolumeBusy``;
        another node cannot take the volume meanwhile."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        device = self.a.attach_volume(dataset_id, NODE_A).device_path
        hold_in_namespace(self, device, os.path.join(self.fake.root, "held"))
        self.assertRaises(VolumeBusy, self.a.detach_volume, dataset_id)
        [volume] = self.fake.volumes.values()
        self.assertEqual("detaching", volume.attachment.state)
        b = backend_on(self.fake, NODE_B, self.fake.add_instance())
        self.assertRaises(AlreadyAttached, b.attach_volume, dataset_id, NODE_B)

    def test_detach_done_when_next_instance_was_quicker(self) -> None:
        """A detach returns, raising nothing, when another instance attached the volume
        before the detaching node looked again (it waits for no "available" it will never
        see), and leaves that attachment alone."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        self.a.attach_volume(dataset_id, NODE_A)
        other = self.fake.add_instance(device_folder=os.path.join(self.fake.root, "other"))
        [volume] = self.fake.volumes.values()

        def sleep(seconds: float) -> None:
            # Between two of the detaching node's looks (it waits in here meanwhile), the
            # volume becomes available and the other instance takes it at once.
            time.sleep(seconds)
            if volume.attachment is not None and volume.attachment.instance_id == other:
                return
            deadline = time.monotonic() + 10
            while volume.state != "available" and time.monotonic() < deadline:
                time.sleep(0.005)
                self.fake.answer({"Action": "DescribeVolumes"})
            self.fake.answer({"Action": "AttachVolume", "VolumeId": volume.volume_id,
                              "InstanceId": other, "Device": "/dev/sdg"})
            # Until EC2 reports the new attachment, it would still say "available".
            time.sleep(2 * self.fake.settings.report_delay)

        a = EBSBackend(CLUSTER, NODE_A, EBSOptions(
            endpoint_url=self.fake.url, metadata_url=self.fake.metadata_url(self.instance),
            device_folder=self.fake.device_folder, limits=QUICK), sleep=sleep)
        a.detach_volume(dataset_id)
        self.assertEqual(other, volume.attachment.instance_id)

    def test_foreign_attachment(self) -> None:
        """A volume attached by hand to an instance its tags do not name has no node."""
        dataset_id = str(uuid.uuid4())
        self.a.create_volume(dataset_id, GiB)
        [volume] = self.fake.volumes.values()
        other = self.fake.add_instance()
        self.fake.answer({"Action": "AttachVolume", "VolumeId": volume.volume_id,
                          "InstanceId": other, "Device": "/dev/xvdf"})
        self.fake.settings.report_delay = 0
        e = self.assertRaises(AlreadyAttached, self.a.attach_volume, dataset_id, NODE_A)
        self.assertIsNone(e.holder)


@pytest.mark.integration
class DeadNodeTests(SynchronousTestCase):
    """Taking a volume from a dead node's instance: forced only once EC2 says it stopped,
    and checked with ``e2fsck`` before the next node uses it."""

    def setUp(self) -> None:
        self.fake = start_fake(self)
        self.dead_instance = self.fake.add_instance()
        self.dead = backend_on(self.fake, NODE_A, self.dead_instance)
        self.taker = backend_on(self.fake, NODE_B, self.fake.add_instance())
        self.dataset_id = str(uuid.uuid4())
        self.dead.create_volume(self.dataset_id, GiB)
        self.device = self.dead.attach_volume(self.dataset_id, NODE_A).device_path
        make_filesystem(self.device)
        [self.volume] = self.fake.volumes.values()

    def forced(self) -> list:
        """The forced detaches asked of the fake."""
        return [r for r in self.fake.requests
                if r["Action"] == "DetachVolume" and r.get("Force") == "true"]

    def test_running_instance_never_forced(self) -> None:
        """While the instance runs, a stuck detach is ``VolumeBusy`` and never forced."""
        hold_in_namespace(self, self.device, os.path.join(self.fake.root, "held"))
        self.assertRaises(VolumeBusy, self.taker.detach_volume, self.dataset_id)
        self.assertEqual([], self.forced())

    def test_stopped_instance_forced_then_checked(self) -> None:
        """Once the instance is stopped, a stuck detach is forced and the volume tagged;
        the next attach runs ``e2fsck`` and removes the tag."""
        hold_in_namespace(self, self.device, os.path.join(self.fake.root, "held"))
        self.fake.set_instance_state(self.dead_instance, "stopped")
        self.taker.detach_volume(self.dataset_id)
        self.assertEqual(1, len(self.forced()))
        self.assertEqual(self.dead_instance, self.volume.tags[TAG_FSCK])
        attached = self.taker.attach_volume(self.dataset_id, NODE_B)
        self.assertEqual(NODE_B, attached.attached_to)
        self.assertNotIn(TAG_FSCK, self.volume.tags)
        self.assertTrue(has_filesystem(attached.device_path))

    def test_damaged_filesystem_not_handed_over(self) -> None:
        """A force-detached volume whose filesystem ``e2fsck -p`` cannot repair is detached
        again, its tag kept, and the attach raises ``FilesystemDamaged``."""
        run_command(["debugfs", "-w", "-R", "clri <2>", self.device])
        self.dead.detach_volume(self.dataset_id)
        self.volume.tags[TAG_FSCK] = self.dead_instance
        e = self.assertRaises(FilesystemDamaged, self.taker.attach_volume, self.dataset_id,
                              NODE_B)
        self.assertIn("e2fsck", str(e))
        self.assertIsNone(self.taker.get_volume(self.dataset_id).attached_to)
        self.assertIn(TAG_FSCK, self.volume.tags)
