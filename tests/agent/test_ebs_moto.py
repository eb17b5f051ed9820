"""
The ebs backend against ``moto_server`` (started on 127.0.0.1 by the test, stopped after):
moto checks the shapes of the requests the backend sends (create, describe, tag, attach,
detach, delete) as botocore and moto read them. Moto attaches nothing for real, so the
wait for a device is expected to fail there; the fake EC2 (test_ebs.py) checks behaviour.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid

import boto3
import pytest
from twisted.trial.unittest import SynchronousTestCase

from pyflock.agent._backends._ebs import EBSBackend, EBSOptions
from pyflock.agent._backends._ebs_model import (
    TAG_CLUSTER, TAG_DATASET, TAG_INSTANCE, TAG_NODE, VolumeStuck, WaitLimits,
)
from pyflock.agent._backends._interface import GiB, BlockVolume
from tests.harness.fake_ec2 import FakeEC2
from tests.harness.processes import free_port, script_path
from tests.harness.requirements import require

NODE = "0b0c7e62-9a4f-4d36-9d54-2a1f7d3c0a01"
CLUSTER = "7d1b6f0e-3c55-4d2e-9a57-0f1e2d3c4b5a"


def start_moto(test_case: SynchronousTestCase) -> str:
    """Start ``moto_server`` on 127.0.0.1 (stopped at cleanup); its URL once it answers."""
    program = script_path("moto_server")
    require(subprocess.run([sys.executable, "-c", "import moto.server"]).returncode == 0,
            "moto[server] is not installed (pip install -e '.[test]')")
    port = free_port("127.0.0.1")
    process = subprocess.Popen([program, "-H", "127.0.0.1", "-p", str(port)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()
    test_case.addCleanup(stop)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"moto_server did not start: "
                                     f"{process.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)


@pytest.mark.integration
class MotoShapesTests(SynchronousTestCase):
    """The backend's requests as moto reads them."""

    def setUp(self) -> None:
        url = start_moto(self)
        self.ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=url,
                                aws_access_key_id="test", aws_secret_access_key="test")
        [instance] = self.ec2.run_instances(
            ImageId="ami-12c6146b", MinCount=1, MaxCount=1,
            Placement={"AvailabilityZone": "us-east-1a"})["Instances"]
        self.instance_id = instance["InstanceId"]
        # The fake's metadata service only: the instance id and zone, role credentials.
        metadata = FakeEC2().start()
        self.addCleanup(metadata.close)
        metadata.add_instance("us-east-1a", self.instance_id)
        self.backend = EBSBackend(CLUSTER, NODE, EBSOptions(
            endpoint_url=url, metadata_url=metadata.metadata_url(self.instance_id),
            device_folder=metadata.device_folder, kms_key_id="alias/pyflock",
            limits=WaitLimits(device=0.2, interval=0.05)))

    def volume(self) -> dict:
        [volume] = self.ec2.describe_volumes(
            Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [CLUSTER]}])["Volumes"]
        return volume

    def test_create_describe_delete(self) -> None:
        """A volume is created in the node's zone, encrypted, gp3, tagged, listed and
        deleted, as moto understands the requests."""
        dataset_id = str(uuid.uuid4())
        created = self.backend.create_volume(dataset_id, 3 * GiB - 1)
        self.assertEqual(BlockVolume(dataset_id, 3 * GiB), created)
        volume = self.volume()
        tags = {t["Key"]: t["Value"] for t in volume["Tags"]}
        self.assertEqual(("us-east-1a", 3, "gp3", True, CLUSTER, dataset_id),
                         (volume["AvailabilityZone"], volume["Size"], volume["VolumeType"],
                          volume["Encrypted"], tags[TAG_CLUSTER], tags[TAG_DATASET]))
        self.assertEqual([created], self.backend.list_volumes())
        self.backend.destroy_volume(dataset_id)
        self.assertEqual([], self.backend.list_volumes())

    def test_attach_tags_and_detach(self) -> None:
        """Attach tags the volume with node and instance and asks for a free device name;
        moto attaches nothing, so the device wait fails; detach then removes the tags."""
        dataset_id = str(uuid.uuid4())
        self.backend.create_volume(dataset_id, GiB)
        self.assertRaises(VolumeStuck, self.backend.attach_volume, dataset_id, NODE)
        volume = self.volume()
        tags = {t["Key"]: t["Value"] for t in volume["Tags"]}
        [attachment] = volume["Attachments"]
        self.assertEqual((NODE, self.instance_id, self.instance_id, "/dev/xvdf"),
                         (tags[TAG_NODE], tags[TAG_INSTANCE], attachment["InstanceId"],
                          attachment["Device"]))
        self.assertEqual(NODE, self.backend.get_volume(dataset_id).attached_to)
        self.backend.detach_volume(dataset_id)
        volume = self.volume()
        self.assertEqual(([], set()), (volume["Attachments"],
                                       {t["Key"] for t in volume["Tags"]}
                                       & {TAG_NODE, TAG_INSTANCE}))
        self.backend.destroy_volume(dataset_id)
