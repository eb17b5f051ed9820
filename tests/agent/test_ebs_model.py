"""
Unit tests of the ebs backend's pure decisions (``_ebs_model``): sizes, profiles, the wait
state machine, device names, device paths and what a volume description means.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends._ebs_model import (
    DEVICE_NAMES, MAX_SIZE_GIB, TAG_DATASET, TAG_INSTANCE, TAG_NODE,
    AttachmentLimitReached, Decision, Goal, Phase, WaitLimits, block_volume, by_id_path,
    choose_device_name, creation_parameters, fsck_succeeded, may_force_detach,
    nvme_device_for, phase_of, pick_volume,
    volume_size_gib, volumes_by_dataset, wait_decision, xen_device_path,
)
from pyflock.agent._backends._interface import GiB, BlockVolume, InvalidVolumeRequest

NODE = "0b0c7e62-9a4f-4d36-9d54-2a1f7d3c0a01"


def described(volume_id="vol-0123456789abcdef0", state="available", attachment=None,
              dataset="d1", node=None, instance=None, size=1, created="2026-01-01"):
    """A volume as ``describe_volumes`` answers it."""
    tags = [{"Key": TAG_DATASET, "Value": dataset}]
    if node:
        tags += [{"Key": TAG_NODE, "Value": node}, {"Key": TAG_INSTANCE, "Value": instance}]
    attachments = [] if attachment is None else [
        {"InstanceId": attachment[0], "Device": "/dev/xvdf", "State": attachment[1]}]
    return {"VolumeId": volume_id, "State": state, "Size": size, "Tags": tags,
            "Attachments": attachments, "CreateTime": created}


class SizeTests(SynchronousTestCase):
    """Sizes become whole GiB."""

    @given(st.integers(min_value=1, max_value=MAX_SIZE_GIB * GiB))
    def test_rounded_up(self, size: int) -> None:
        """The GiB count is the smallest that holds ``size``."""
        gib = volume_size_gib(size)
        self.assertTrue(gib * GiB >= size > (gib - 1) * GiB, (size, gib))

    def test_refused(self) -> None:
        """Non-positive, fractional and too large sizes raise ``InvalidVolumeRequest``."""
        for size in (0, -1, 1.5, True, MAX_SIZE_GIB * GiB + 1):
            self.assertRaises(InvalidVolumeRequest, volume_size_gib, size)


class ProfileTests(SynchronousTestCase):
    """Profiles map to volume types, encrypted by default."""

    def test_gold(self) -> None:
        """Gold is io2 at 500 IOPS a GiB, within io2's bounds."""
        self.assertEqual(("io2", 5000), (creation_parameters(10, "gold")["VolumeType"],
                                         creation_parameters(10, "gold")["Iops"]))
        self.assertEqual(64000, creation_parameters(1000, "gold")["Iops"])

    def test_silver(self) -> None:
        """Silver is gp3 above its baseline, as far as the size allows."""
        self.assertEqual({"VolumeType": "gp3", "Size": 20, "Iops": 6000, "Throughput": 250,
                          "Encrypted": True}, creation_parameters(20, "silver"))
        self.assertEqual(3000, creation_parameters(1, "silver")["Iops"])

    def test_bronze_and_default(self) -> None:
        """Bronze, and no profile, are gp3 at its baseline (no IOPS or throughput asked)."""
        expected = {"VolumeType": "gp3", "Size": 5, "Encrypted": True}
        for profile in ("bronze", "BRONZE", None, ""):
            self.assertEqual(expected, creation_parameters(5, profile))

    def test_unknown(self) -> None:
        """An unknown profile is refused, naming the known ones."""
        e = self.assertRaises(InvalidVolumeRequest, creation_parameters, 1, "platinum")
        self.assertIn("gold", str(e))

    def test_kms(self) -> None:
        """A KMS key is passed when encrypting, ignored when not."""
        self.assertEqual("arn:key", creation_parameters(1, None, True, "arn:key")["KmsKeyId"])
        unencrypted = creation_parameters(1, None, False, "arn:key")
        self.assertEqual((False, False), (unencrypted["Encrypted"], "KmsKeyId" in unencrypted))


class PhaseTests(SynchronousTestCase):
    """A description's phase."""

    def test_phases(self) -> None:
        """Each state and attachment state reads as its phase."""
        cases = [(None, Phase.GONE),
                 (described(state="creating"), Phase.CREATING),
                 (described(), Phase.AVAILABLE),
                 (described(state="in-use", attachment=("i-1", "attaching")), Phase.ATTACHING),
                 (described(state="in-use", attachment=("i-1", "attached")), Phase.IN_USE),
                 (described(state="in-use", attachment=("i-1", "detaching")), Phase.DETACHING),
                 (described(state="in-use", attachment=("i-1", "busy")), Phase.DETACHING),
                 (described(state="in-use", attachment=("i-1", "detached")), Phase.DETACHING),
                 (described(state="deleting"), Phase.DELETING),
                 (described(state="deleted"), Phase.GONE),
                 (described(state="error"), Phase.ERROR)]
        self.assertEqual([p for _, p in cases], [phase_of(v) for v, _ in cases])


class WaitTests(SynchronousTestCase):
    """The wait state machine."""

    def test_done(self) -> None:
        """Each goal is reached by its phase."""
        for goal, phase in [(Goal.CREATED, Phase.AVAILABLE), (Goal.ATTACHED, Phase.IN_USE),
                            (Goal.DETACHED, Phase.AVAILABLE), (Goal.DELETED, Phase.GONE),
                            (Goal.DELETED, Phase.DELETING)]:
            self.assertEqual(Decision.DONE, wait_decision(goal, phase, 0, 1), (goal, phase))

    def test_eventual_consistency_waits(self) -> None:
        """A volume not yet described, or an attach/detach not yet reported, is waited for."""
        for goal, phase in [(Goal.CREATED, Phase.GONE), (Goal.ATTACHED, Phase.AVAILABLE),
                            (Goal.DETACHED, Phase.IN_USE), (Goal.DELETED, Phase.AVAILABLE)]:
            self.assertEqual(Decision.WAIT, wait_decision(goal, phase, 0, 1), (goal, phase))

    def test_bounded(self) -> None:
        """Every wait fails once its limit has passed."""
        self.assertEqual(Decision.FAIL, wait_decision(Goal.DETACHED, Phase.DETACHING, 5, 5))

    def test_unexpected_phase_fails(self) -> None:
        """A phase a goal cannot pass through fails at once."""
        for goal, phase in [(Goal.CREATED, Phase.ERROR), (Goal.ATTACHED, Phase.DELETING),
                            (Goal.DETACHED, Phase.GONE)]:
            self.assertEqual(Decision.FAIL, wait_decision(goal, phase, 0, 9), (goal, phase))

    def test_attached_elsewhere_fails(self) -> None:
        """In use on another instance is not attached here."""
        self.assertEqual(Decision.FAIL, wait_decision(Goal.ATTACHED, Phase.IN_USE, 0, 9,
                                                      instance_ok=False))

    def test_detached_once_attached_elsewhere(self) -> None:
        """A detach is done once the volume is in use on another instance (the next node
        attached it between two looks), not only when it is available."""
        for phase in (Phase.ATTACHING, Phase.IN_USE):
            self.assertEqual(Decision.DONE, wait_decision(Goal.DETACHED, phase, 0, 9,
                                                          attached_elsewhere=True))

    def test_limits(self) -> None:
        """Each goal has its own limit."""
        limits = WaitLimits(created=1, attached=2, detached=3, deleted=4)
        self.assertEqual([1, 2, 3, 4], [limits.of(g) for g in Goal])


class DeviceNameTests(SynchronousTestCase):
    """Device names never collide and stay within the limit."""

    def test_first_free(self) -> None:
        """The first name no attachment uses, ``sdX`` and ``xvdX`` counting as one."""
        self.assertEqual("/dev/xvdh",
                         choose_device_name({"/dev/xvda", "/dev/sdf", "/dev/xvdg"}, 26, "i-1"))

    def test_limit(self) -> None:
        """At the limit, ``AttachmentLimitReached`` names the instance and the limit."""
        e = self.assertRaises(AttachmentLimitReached, choose_device_name,
                              {"/dev/xvda", "/dev/xvdf"}, 2, "i-1")
        self.assertIn("i-1", str(e))
        self.assertIn("2", str(e))

    def test_names_run_out(self) -> None:
        """With every name taken and a higher limit, the limit error still comes."""
        self.assertRaises(AttachmentLimitReached, choose_device_name, set(DEVICE_NAMES),
                          1000, "i-1")

    @given(st.sets(st.sampled_from(DEVICE_NAMES)))
    def test_never_taken(self, taken: set) -> None:
        """The chosen name is never one already taken."""
        if len(taken) < len(DEVICE_NAMES):
            self.assertNotIn(choose_device_name(taken, 1000, "i-1"), taken)


class DevicePathTests(SynchronousTestCase):
    """Where a volume's device is, by its id."""

    def test_by_id(self) -> None:
        """The udev link names the volume id without its dash."""
        self.assertEqual("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc",
                         by_id_path("/dev", "vol-0abc"))

    def test_xen(self) -> None:
        """On Xen, ``/dev/sdf`` shows as ``xvdf``."""
        self.assertEqual(["/dev/xvdf", "/dev/xvdba"], [xen_device_path("/dev", "/dev/sdf"),
                                                       xen_device_path("/dev", "/dev/xvdba")])

    def test_nvme_serial(self) -> None:
        """The namespace whose controller's serial is the volume's is found; none else."""
        serials = {"nvme0n1": "vol0root\n", "nvme1n1": "vol0abc  \n"}
        self.assertEqual(("nvme1n1", None), (nvme_device_for("vol-0abc", serials),
                                             nvme_device_for("vol-0def", serials)))


class BlockVolumeTests(SynchronousTestCase):
    """What a description says as a ``BlockVolume``."""

    def test_unattached(self) -> None:
        """No attachment: no node, no device; the size in bytes."""
        self.assertEqual(BlockVolume("d1", 2 * GiB),
                         block_volume(described(size=2), "/dev", False))

    def test_attached_by_pyflock(self) -> None:
        """Attached to the instance its tags name: that node, and the by-id path."""
        volume = described(state="in-use", attachment=("i-1", "attached"), node=NODE,
                           instance="i-1")
        self.assertEqual(BlockVolume("d1", GiB, NODE, by_id_path("/dev", volume["VolumeId"])),
                         block_volume(volume, "/dev", False))

    def test_foreign(self) -> None:
        """Attached to another instance than its tags name: no node, but a device."""
        volume = described(state="in-use", attachment=("i-2", "attached"), node=NODE,
                           instance="i-1")
        self.assertEqual(BlockVolume("d1", GiB, None, "/dev/xvdf"),
                         block_volume(volume, "/dev", True))

    def test_pick(self) -> None:
        """Of a dataset's volumes, the attached one, else the oldest; deleting ones never."""
        old, new = described("vol-1", created="2026-01-01"), described("vol-2", created="2027")
        attached = described("vol-3", state="in-use", attachment=("i-1", "attached"))
        self.assertEqual("vol-1", pick_volume([new, old])["VolumeId"])
        self.assertEqual("vol-3", pick_volume([new, old, attached])["VolumeId"])
        self.assertIsNone(pick_volume([described(state="deleting")]))

    def test_by_dataset(self) -> None:
        """Volumes are grouped by dataset tag, sorted; untagged ones are left out."""
        untagged = dict(described("vol-9"), Tags=[])
        found = volumes_by_dataset([described("vol-2", dataset="b"),
                                    described("vol-1", dataset="a"), untagged])
        self.assertEqual(["a", "b"], list(found))



class DeadNodeDecisionTests(SynchronousTestCase):
    """When a detach may be forced, and when a check passed."""

    def test_force_only_stopped_other_instance(self) -> None:
        """Only another instance, stopped or terminated, may lose its volume by force."""
        self.assertEqual(
            [True, True, False, False, False, False],
            [may_force_detach("stopped", False), may_force_detach("terminated", False),
             may_force_detach("running", False), may_force_detach("stopping", False),
             may_force_detach(None, False), may_force_detach("stopped", True)])

    def test_fsck_codes(self) -> None:
        """``e2fsck -p`` exit codes 0 to 2 leave a mountable filesystem; 4 and 8 do not."""
        self.assertEqual([True, True, True, False, False],
                         [fsck_succeeded(c) for c in (0, 1, 2, 4, 8)])
