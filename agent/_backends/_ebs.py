"""
The ``ebs`` backend: datasets on Amazon EBS volumes, seen from one EC2 instance.

A thin shell over boto3 and the instance metadata service; every decision (the state
machine of the waits, device names, sizes, profiles, what a description means) is a pure
function of ``_ebs_model``. The volumes' tags are the truth (cluster, dataset, and the node
and instance of the attachment pyflock made); nothing is kept on the node. Credentials come
only from the instance's role, through the metadata service with IMDSv2 tokens; the instance
id, zone and region too. Every call blocks: the agent makes them in its thread pools.
docs/backends.md describes it.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
import uuid
from typing import Callable, Optional

import attr
import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import CredentialResolver, InstanceMetadataProvider
from botocore.exceptions import BotoCoreError, ClientError
from botocore.utils import InstanceMetadataFetcher
from zope.interface import implementer

from pyflock.agent._backends._ebs_model import (
    DEFAULT_ATTACHMENT_LIMIT, TAG_CLUSTER, TAG_DATASET, TAG_FSCK, TAG_INSTANCE, TAG_NODE,
    AttachmentLimitReached, Decision, Phase, fsck_succeeded, may_force_detach,
    Goal, VolumeStuck, WaitLimits, attachment_of, block_volume, by_id_path,
    choose_device_name, creation_parameters, device_path_of, nvme_device_for, phase_of,
    pick_volume, tags_of, volume_size_gib, volumes_by_dataset, wait_decision,
)
from pyflock.agent._fs import CommandFailed, has_filesystem, run_command
from pyflock.agent._backends._interface import (
    GiB, AlreadyAttached, BackendError, BlockVolume, IBlockDeviceBackend,
    InvalidVolumeRequest, UnattachedVolume, UnknownVolume, VolumeBusy, VolumeExists,
    check_dataset_id, check_node_uuid,
)

#: The instance metadata service's address on every EC2 instance.
METADATA_URL = "http://169.254.169.254"

#: Seconds an IMDSv2 token lives.
TOKEN_TTL = 21600

#: Seconds one metadata request may take.
METADATA_TIMEOUT = 5.0

#: botocore's retries: adaptive mode (client-side rate limiting after throttling errors).
RETRIES = {"mode": "adaptive", "max_attempts": 10}


class EC2Error(BackendError):
    """EC2 refused a call or could not be reached; the message has its code and text."""


class WrongZone(BackendError):
    """The volume is in another availability zone than this node's instance."""


class FilesystemDamaged(BackendError):
    """A force-detached volume's filesystem did not pass ``e2fsck -f -p``; it was detached
    again so that nothing mounts it, and needs a check by hand."""

    def __str__(self) -> str:
        dataset_id, volume_id, problem = self.args
        return (f"the volume of dataset {dataset_id} ({volume_id}) was force-detached from "
                f"a stopped instance and `e2fsck -f -p` could not repair its filesystem "
                f"({problem}); attach it by hand and run `e2fsck` on it, then remove its "
                f"{TAG_FSCK} tag")


@attr.s(frozen=True, auto_attribs=True)
class EBSOptions:
    """The ``dataset`` section of agent.yml for the ebs backend (docs/backends.md)."""

    region: Optional[str] = None
    endpoint_url: Optional[str] = None
    metadata_url: str = METADATA_URL
    device_folder: str = "/dev"
    encrypted: bool = True
    kms_key_id: Optional[str] = None
    attachment_limit: int = DEFAULT_ATTACHMENT_LIMIT
    default_size: int = 10 * GiB
    limits: WaitLimits = WaitLimits()

    @classmethod
    def from_config(cls, options: dict, default_size: int) -> "EBSOptions":
        """The options of agent.yml's validated ``dataset`` section (less ``backend``)."""
        options = dict(options)
        limits = WaitLimits(**options.pop("wait_limits", {}))
        return cls(default_size=default_size, limits=limits, **options)


@attr.s(frozen=True, auto_attribs=True)
class InstanceIdentity:
    """Which instance this node is: its id, availability zone and region."""

    instance_id: str
    zone: str
    region: str


def read_instance_identity(metadata_url: str, timeout: float = METADATA_TIMEOUT
                           ) -> InstanceIdentity:
    """The instance's id, zone and region from the metadata service (IMDSv2 token flow)."""
    base = metadata_url.rstrip("/")
    try:
        request = urllib.request.Request(
            f"{base}/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            token = response.read().decode()

        def get(path: str) -> str:
            request = urllib.request.Request(f"{base}/latest/meta-data/{path}",
                                             headers={"X-aws-ec2-metadata-token": token})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read().decode().strip()
        return InstanceIdentity(get("instance-id"), get("placement/availability-zone"),
                                get("placement/region"))
    except OSError as e:
        raise EC2Error(f"the instance metadata service at {base} did not answer ({e}); the "
                       f"ebs backend runs only on an EC2 instance (IMDSv2)") from None


def make_ec2_client(region: str, options: EBSOptions):
    """An EC2 client with the instance role's credentials only and adaptive retries."""
    session = botocore.session.Session()
    fetcher = InstanceMetadataFetcher(timeout=METADATA_TIMEOUT, num_attempts=3,
                                      base_url=options.metadata_url)
    session.register_component("credential_provider", CredentialResolver(
        [InstanceMetadataProvider(iam_role_fetcher=fetcher)]))
    return boto3.Session(botocore_session=session).client(
        "ec2", region_name=region, endpoint_url=options.endpoint_url,
        config=Config(retries=RETRIES, connect_timeout=10, read_timeout=60))


def _code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def _ec2_error(error: Exception) -> EC2Error:
    return EC2Error(f"EC2 refused the call: {error}")


def ec2_call(client, operation: str, **parameters):
    """``client.<operation>(**parameters)``, its failures as ``EC2Error`` (blocking)."""
    try:
        return getattr(client, operation)(**parameters)
    except ClientError as e:
        raise EC2Error(f"EC2 {operation} failed: {_code(e)}: "
                       f"{e.response.get('Error', {}).get('Message', '')}") from None
    except BotoCoreError as e:
        raise _ec2_error(e) from None


def describe_volumes(client, filters: list, volume_ids: tuple = ()) -> list:
    """Every volume matching ``filters`` (and ``volume_ids``), all pages; none if a volume
    id is unknown (blocking)."""
    pages = client.get_paginator("describe_volumes").paginate(
        Filters=filters, **({"VolumeIds": list(volume_ids)} if volume_ids else {}))
    try:
        return [v for page in pages for v in page["Volumes"]]
    except ClientError as e:
        if _code(e) == "InvalidVolume.NotFound":
            return []
        raise _ec2_error(e) from None
    except BotoCoreError as e:
        raise _ec2_error(e) from None


def block_device_size(path: str, sys_root: str = "/sys") -> Optional[int]:
    """The size in bytes of the block device at ``path`` (a link is followed), from sysfs;
    None if there is no such device."""
    name = os.path.basename(os.path.realpath(path))
    try:
        with open(os.path.join(sys_root, "class", "block", name, "size")) as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def nvme_serials(sys_root: str = "/sys") -> dict:
    """The serial of each NVMe namespace's controller (``nvme1n1``: ``vol0abc...``)."""
    serials = {}
    block = os.path.join(sys_root, "block")
    for name in sorted(os.listdir(block)) if os.path.isdir(block) else ():
        if name.startswith("nvme"):
            try:
                with open(os.path.join(block, name, "device", "serial")) as f:
                    serials[name] = f.read()
            except OSError:
                continue
    return serials


def local_device(volume, attachment, device_folder: str, xen: bool,
                 sys_root: str = "/sys") -> Optional[str]:
    """
    A described volume's device on this instance, found by its id (the by-id link, else
    the NVMe namespace with its serial; on Xen the ``xvd`` name), if it is there with the
    volume's size; None otherwise.
    """
    size = int(volume["Size"]) * GiB
    volume_id = volume["VolumeId"]
    if xen:
        candidates = [device_path_of(device_folder, volume_id, attachment, True)]
    else:
        candidates = [by_id_path(device_folder, volume_id)]
        name = nvme_device_for(volume_id, nvme_serials(sys_root))
        if name is not None:
            candidates.append(os.path.join(device_folder, name))
    for path in candidates:
        if os.path.exists(path) and block_device_size(path, sys_root) == size:
            return path
    return None


def repair_filesystem(path: str) -> Optional[str]:
    """``e2fsck -f -p`` the filesystem on ``path``, if it has one; None when it is fine or
    was repaired, else what went wrong."""
    try:
        if has_filesystem(path):
            run_command(["e2fsck", "-f", "-p", path])
    except CommandFailed as e:
        if not fsck_succeeded(e.returncode):
            return str(e)
    return None


@implementer(IBlockDeviceBackend)
class EBSBackend:
    """
    The ebs backend of node ``node_uuid`` in cluster ``cluster_id``. The instance and the
    client are found on first use (from a thread), so building one never blocks.
    ``clock`` and ``sleep`` drive the waits; ``sys_root`` is where sysfs is.
    """

    def __init__(self, cluster_id: str, node_uuid: str, options: EBSOptions = EBSOptions(),
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, sys_root: str = "/sys",
                 identity: Optional[InstanceIdentity] = None, client=None):
        self.cluster_id = cluster_id
        self.node_uuid = node_uuid
        self.options = options
        self._clock, self._sleep, self._sys_root = clock, sleep, sys_root
        self._identity, self._client = identity, client
        self._setup_lock = threading.Lock()
        self._names_lock = threading.Lock()
        self._reserved: set = set()
        self._xen: Optional[bool] = None

    def __repr__(self) -> str:
        return f"EBSBackend(cluster={self.cluster_id!r}, node={self.node_uuid!r})"

    @property
    def identity(self) -> InstanceIdentity:
        """This node's instance (read from the metadata service once)."""
        self._setup()
        return self._identity

    @property
    def client(self):
        """The boto3 EC2 client."""
        self._setup()
        return self._client

    def _setup(self) -> None:
        with self._setup_lock:
            if self._identity is None:
                self._identity = read_instance_identity(self.options.metadata_url)
            if self._client is None:
                self._client = make_ec2_client(
                    self.options.region or self._identity.region, self.options)
            if self._xen is None:
                self._xen = _read(os.path.join(self._sys_root, "hypervisor", "type")) == "xen"

    def availability_zone(self) -> str:
        """This node's availability zone (from the metadata service, once), which the agent
        reports to the control service."""
        return self.identity.zone

    def allocation_unit(self) -> int:
        """EBS sizes are whole GiB."""
        return GiB

    def list_volumes(self) -> list[BlockVolume]:
        """Every volume tagged with this cluster, sorted by dataset id."""
        found = volumes_by_dataset(describe_volumes(self.client, [self._cluster_filter()]))
        return [self._block(v) for v in found.values()]

    def get_volume(self, dataset_id: str) -> BlockVolume:
        """One volume as ``list_volumes`` lists it."""
        return self._block(self._find(dataset_id))

    def create_volume(self, dataset_id: str, size: Optional[int] = None,
                      profile: Optional[str] = None) -> BlockVolume:
        """Create an encrypted volume in this node's zone, tagged, and wait until usable."""
        check_dataset_id(dataset_id)
        gib = volume_size_gib(self.options.default_size if size is None else size)
        parameters = creation_parameters(gib, profile, self.options.encrypted,
                                         self.options.kms_key_id)
        if self._find_raw(dataset_id) is not None:
            raise VolumeExists(dataset_id)
        tags = [{"Key": TAG_CLUSTER, "Value": self.cluster_id},
                {"Key": TAG_DATASET, "Value": dataset_id},
                {"Key": "Name", "Value": f"pyflock-{dataset_id}"}]
        created = ec2_call(self.client, "create_volume", AvailabilityZone=self.identity.zone,
                             ClientToken=f"pyflock-{uuid.uuid4()}",
                             TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
                             **parameters)
        volume = self._wait(created["VolumeId"], Goal.CREATED, dataset_id)
        kept = self._find_raw(dataset_id)
        if kept is not None and kept["VolumeId"] != volume["VolumeId"]:
            # An earlier creation not yet described when we looked: keep one volume.
            ec2_call(self.client, "delete_volume", VolumeId=volume["VolumeId"])
            raise VolumeExists(dataset_id)
        return self._block(volume)

    def attach_volume(self, dataset_id: str, node_uuid: str) -> BlockVolume:
        """Attach the volume to this node's instance and wait for its device."""
        check_node_uuid(node_uuid)
        if node_uuid != self.node_uuid:
            raise InvalidVolumeRequest(
                f"the ebs backend of node {self.node_uuid} attaches volumes to its own "
                f"instance only, not to node {node_uuid}")
        volume = self._find(dataset_id)
        if phase_of(volume) is Phase.CREATING:
            volume = self._wait(volume["VolumeId"], Goal.CREATED, dataset_id)
        self._refuse_attached(volume)
        volume_id, instance = volume["VolumeId"], self.identity.instance_id
        if volume.get("AvailabilityZone") not in (None, self.identity.zone):
            raise self._wrong_zone(dataset_id, volume)
        ec2_call(self.client, "create_tags", Resources=[volume_id],
                   Tags=[{"Key": TAG_NODE, "Value": self.node_uuid},
                         {"Key": TAG_INSTANCE, "Value": instance}])
        name = self._attach_with_free_name(dataset_id, volume)
        try:
            volume = self._wait(volume_id, Goal.ATTACHED, dataset_id)
        finally:
            with self._names_lock:
                self._reserved.discard(name)
        path = self._wait_for_device(volume)
        if TAG_FSCK in tags_of(volume):
            self._check_filesystem(dataset_id, volume, path)
        return attr.evolve(self._block(volume), device_path=path)

    def detach_volume(self, dataset_id: str, discard: bool = False) -> None:
        """Detach the volume from its instance; returns once EC2 and the device agree (an
        EBS volume holds what was written to it, ``discard`` or not)."""
        volume = self._find(dataset_id)
        attachment = attachment_of(volume)
        if attachment is None:
            if TAG_NODE not in tags_of(volume):
                raise UnattachedVolume(dataset_id)
            self._forget_node(volume)
            return
        ours = attachment.instance_id == self.identity.instance_id
        path = device_path_of(self.options.device_folder, volume["VolumeId"], attachment,
                              self._xen)
        if attachment.state not in ("detaching", "busy"):
            try:
                ec2_call(self.client, "detach_volume", VolumeId=volume["VolumeId"],
                           InstanceId=attachment.instance_id, Device=attachment.device)
            except EC2Error as e:
                if "IncorrectState" not in str(e):
                    raise
        try:
            self._wait(volume["VolumeId"], Goal.DETACHED, dataset_id, attachment.instance_id)
        except VolumeStuck:
            if not may_force_detach(self._instance_state(attachment.instance_id), ours):
                raise VolumeBusy(dataset_id, (path,)) from None
            self._force_detach(dataset_id, volume, attachment)
        if ours and not self._until(lambda: self._local_device(volume, attachment) is None,
                                    self.options.limits.device):
            raise VolumeBusy(dataset_id, (path,))
        self._forget_node(volume)

    def destroy_volume(self, dataset_id: str) -> None:
        """Delete an unattached volume; returns once EC2 reports it deleting."""
        volume = self._find(dataset_id)
        self._refuse_attached(volume)
        try:
            ec2_call(self.client, "delete_volume", VolumeId=volume["VolumeId"])
        except EC2Error as e:
            if "VolumeInUse" in str(e):
                self._refuse_attached(self._find(dataset_id))
            if "InvalidVolume.NotFound" not in str(e):
                raise
        self._wait(volume["VolumeId"], Goal.DELETED, dataset_id)

    def get_device_path(self, dataset_id: str) -> str:
        """The device of a volume attached to this node's instance."""
        volume = self._find(dataset_id)
        block = self._block(volume)
        if block.attached_to != self.node_uuid or \
                attachment_of(volume).instance_id != self.identity.instance_id:
            raise UnattachedVolume(dataset_id)
        return self._local_device(volume, attachment_of(volume)) or block.device_path

    # The shell's helpers.

    def _block(self, volume) -> BlockVolume:
        self._setup()
        return block_volume(volume, self.options.device_folder, self._xen)

    def _cluster_filter(self) -> dict:
        return {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.cluster_id]}

    def _find_raw(self, dataset_id: str):
        check_dataset_id(dataset_id)
        return pick_volume(describe_volumes(self.client, 
            [self._cluster_filter(), {"Name": f"tag:{TAG_DATASET}", "Values": [dataset_id]}]))

    def _find(self, dataset_id: str):
        volume = self._find_raw(dataset_id)
        if volume is None:
            raise UnknownVolume(dataset_id)
        return volume

    def _refuse_attached(self, volume) -> None:
        block = self._block(volume)
        if block.device_path is not None:
            raise AlreadyAttached(block.dataset_id, block.attached_to, block.device_path)

    def _wrong_zone(self, dataset_id: str, volume) -> WrongZone:
        return WrongZone(f"the volume of dataset {dataset_id} ({volume['VolumeId']}) is in "
                         f"{volume.get('AvailabilityZone')}, this node's instance in "
                         f"{self.identity.zone}: EBS volumes attach only within their zone")

    def _attach_with_free_name(self, dataset_id: str, volume) -> str:
        """Ask EC2 to attach under a name no attachment of the instance uses; the name
        stays reserved until the caller's wait ends, so two attaches never collide."""
        refused: set = set()
        for _ in range(3):
            with self._names_lock:
                taken = self._instance_device_names() | self._reserved | refused
                name = choose_device_name(taken, self.options.attachment_limit,
                                          self.identity.instance_id)
                self._reserved.add(name)
            try:
                ec2_call(self.client, "attach_volume", VolumeId=volume["VolumeId"], Device=name,
                           InstanceId=self.identity.instance_id)
                return name
            except EC2Error as e:
                with self._names_lock:
                    self._reserved.discard(name)
                text = str(e)
                if "ZoneMismatch" in text:
                    raise self._wrong_zone(dataset_id, volume) from None
                if "VolumeInUse" in text or "IncorrectState" in text:
                    self._refuse_attached(self._find(dataset_id))
                if "AttachmentLimitExceeded" in text:
                    raise AttachmentLimitReached(self.identity.instance_id,
                                                 self.options.attachment_limit) from None
                if "already in use" not in text:
                    raise
                refused.add(name)
        raise EC2Error(f"EC2 refused three device names for the volume of dataset "
                       f"{dataset_id} on {self.identity.instance_id}; try again")

    def _instance_device_names(self) -> set:
        answer = ec2_call(self.client, "describe_instances",
                          InstanceIds=[self.identity.instance_id])
        names = set()
        for reservation in answer.get("Reservations", ()):
            for instance in reservation.get("Instances", ()):
                names.update(m["DeviceName"] for m in instance.get("BlockDeviceMappings", ()))
        # Attachments not yet in the instance's mappings (eventual consistency).
        for volume in describe_volumes(self.client, [{"Name": "attachment.instance-id",
                                       "Values": [self.identity.instance_id]}]):
            attachment = attachment_of(volume)
            if attachment is not None and attachment.instance_id == self.identity.instance_id:
                names.add(attachment.device)
        return names

    def _wait(self, volume_id: str, goal: Goal, dataset_id: str,
              detached_from: Optional[str] = None):
        """Look at the volume until ``wait_decision`` says done or fail (bounded); a detach
        from instance ``detached_from`` is done once the volume is attached elsewhere."""
        start, limit = self._clock(), self.options.limits.of(goal)
        while True:
            found = describe_volumes(self.client, [], (volume_id,))
            volume = found[0] if found else None
            phase = phase_of(volume)
            attachment = attachment_of(volume) if volume else None
            instance_ok = goal is not Goal.ATTACHED or (
                attachment is not None
                and attachment.instance_id == self.identity.instance_id)
            elsewhere = attachment is not None and detached_from not in (
                None, attachment.instance_id)
            decision = wait_decision(goal, phase, self._clock() - start, limit, instance_ok,
                                     elsewhere)
            if decision is Decision.DONE:
                return volume
            if decision is Decision.FAIL:
                raise VolumeStuck(
                    f"the volume of dataset {dataset_id} ({volume_id}) is {phase.value} "
                    f"after {self._clock() - start:.0f} s of waiting for it to be "
                    f"{goal.value} (limit {limit:g} s)")
            self._sleep(self.options.limits.interval)

    def _until(self, condition: Callable[[], bool], limit: float) -> bool:
        start = self._clock()
        while not condition():
            if self._clock() - start >= limit:
                return False
            self._sleep(self.options.limits.interval)
        return True

    def _local_device(self, volume, attachment) -> Optional[str]:
        return local_device(volume, attachment, self.options.device_folder, self._xen,
                            self._sys_root)

    def _wait_for_device(self, volume) -> str:
        attachment = attachment_of(volume)
        found: list = []
        if not self._until(lambda: found.append(self._local_device(volume, attachment))
                           or found[-1] is not None, self.options.limits.device):
            raise VolumeStuck(
                f"EC2 reports {volume['VolumeId']} attached as {attachment.device}, but no "
                f"device of its id and size {volume['Size']} GiB appeared under "
                f"{self.options.device_folder} within {self.options.limits.device:g} s")
        return found[-1]

    def _instance_state(self, instance_id: str) -> Optional[str]:
        """The state EC2 reports for an instance (``terminated`` once it is not known)."""
        try:
            answer = ec2_call(self.client, "describe_instances", InstanceIds=[instance_id])
        except EC2Error as e:
            if "InvalidInstanceID.NotFound" in str(e):
                return "terminated"
            raise
        for reservation in answer.get("Reservations", ()):
            for instance in reservation.get("Instances", ()):
                return instance.get("State", {}).get("Name")
        return "terminated"

    def _force_detach(self, dataset_id: str, volume, attachment) -> None:
        """Force the detach from a stopped or terminated instance, marking the volume so
        that the next node checks its filesystem first."""
        ec2_call(self.client, "create_tags", Resources=[volume["VolumeId"]],
                   Tags=[{"Key": TAG_FSCK, "Value": attachment.instance_id}])
        ec2_call(self.client, "detach_volume", VolumeId=volume["VolumeId"],
                   InstanceId=attachment.instance_id, Device=attachment.device, Force=True)
        self._wait(volume["VolumeId"], Goal.DETACHED, dataset_id, attachment.instance_id)

    def _check_filesystem(self, dataset_id: str, volume, path: str) -> None:
        """Repair a force-detached volume's filesystem before anything mounts it; if it
        cannot be, detach the volume again and raise ``FilesystemDamaged``."""
        problem = repair_filesystem(path)
        if problem is not None:
            self.detach_volume(dataset_id)
            raise FilesystemDamaged(dataset_id, volume["VolumeId"], problem)
        ec2_call(self.client, "delete_tags", Resources=[volume["VolumeId"]],
                   Tags=[{"Key": TAG_FSCK, "Value": tags_of(volume)[TAG_FSCK]}])

    def _forget_node(self, volume) -> None:
        """Remove the node tags the volume had when we looked; only if they still have
        those values (EC2 deletes a tag given with a value only if it matches), so that a
        node that attached it since keeps its own."""
        tags = tags_of(volume)
        ec2_call(self.client, "delete_tags", Resources=[volume["VolumeId"]],
                   Tags=[{"Key": k, "Value": tags[k]} for k in (TAG_NODE, TAG_INSTANCE)
                         if k in tags])


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
