"""
A small EC2-compatible volume service and instance metadata service for tests, on one HTTP
server (the standard library's, in a thread): boto3 talks to it through ``endpoint_url``
(the EC2 query protocol: ``Action=...`` form posts, XML answers), and each simulated
instance's metadata is under ``/metadata/<instance-id>`` (IMDSv2: PUT a token, then GET
with it; the instance's id, zone, region and role credentials).

It really attaches: a volume is a sparse file, an attached volume a loop device with the
link ``<device_folder>/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...`` a Nitro
instance's udev makes. It models what moto does not (docs/testing.md): the creating,
attaching and detaching states with delays, eventual consistency (a new volume not yet
described, an attach or detach not yet reported), throttling, zone mismatch, device names
in use, the attachment limit, ``ClientToken`` idempotency, and a detach that stays
"detaching" while something holds the device (it completes once the holder lets go). Time
is read from ``clock`` when a request comes, so nothing runs in the background. Needs root.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import secrets
import shutil
import tempfile
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Callable, Optional

import attr

from pyflock.agent._backends._ebs_model import BY_ID_PREFIX, device_letters, nvme_serial
from pyflock.agent._backends._loopback import _backing_file, release_loop_device
from pyflock.agent._fs import run_command

_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
_GiB = 1024 ** 3


@attr.s(auto_attribs=True)
class FakeSettings:
    """Seconds each transition takes, and the traps, all configurable per test."""

    create_delay: float = 0.1
    attach_delay: float = 0.1
    detach_delay: float = 0.1
    visibility_delay: float = 0.05   # a new volume is not described before this
    report_delay: float = 0.05       # an attach/detach shows in descriptions after this
    throttle_every: int = 0          # every Nth request is refused as throttled (0: none)
    attachment_limit: int = 26       # EBS volumes per instance, the root volume included


class EC2Refusal(Exception):
    """An EC2 error answer: its code, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(code, message)
        self.code, self.message, self.status = code, message, status


@attr.s(auto_attribs=True)
class FakeAttachment:
    instance_id: str
    device: str
    state: str                      # attaching, attached, detaching
    since: float
    loop: Optional[str] = None
    released: bool = False


@attr.s(auto_attribs=True)
class FakeVolume:
    volume_id: str
    size: int                       # GiB
    zone: str
    parameters: dict
    tags: dict
    created: float
    path: str
    state: str = "creating"         # creating, available, in-use, deleting
    attachment: Optional[FakeAttachment] = None


@attr.s(auto_attribs=True)
class FakeInstance:
    instance_id: str
    zone: str
    state: str = "running"
    device_folder: Optional[str] = None   # None: the service's shared one


class FakeEC2:
    """The fake services' state; ``start`` serves them, ``close`` detaches and removes all."""

    def __init__(self, settings: Optional[FakeSettings] = None, region: str = "us-east-1",
                 clock: Optional[Callable[[], float]] = None):
        import time
        self.settings = settings or FakeSettings()
        self.region = region
        self.clock = clock or time.monotonic
        self.root = tempfile.mkdtemp(prefix="pf-ec2-")
        self.device_folder = os.path.join(self.root, "dev")
        os.makedirs(os.path.join(self.device_folder, "disk", "by-id"))
        os.makedirs(os.path.join(self.root, "volumes"))
        self.volumes: dict = {}
        self.instances: dict = {}
        self.tokens: set = set()
        self.requests: list = []
        self.access_keys: set = set()   # the access key ids requests were signed with
        self.forced_loops: list = []     # (loop device, file) left by forced detaches
        self._client_tokens: dict = {}
        self._lock = threading.RLock()
        self._server: Optional[http.server.ThreadingHTTPServer] = None

    # Serving.

    def start(self, host: str = "127.0.0.1") -> "FakeEC2":
        """Serve on ``host`` at a free port, in a thread."""
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_PUT(self) -> None:
                fake._metadata(self, "PUT")

            def do_GET(self) -> None:
                fake._metadata(self, "GET")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                signed = self.headers.get("Authorization", "")
                fake.access_keys.add(signed.partition("Credential=")[2].partition("/")[0])
                status, text = fake.answer(dict(urllib.parse.parse_qsl(body)))
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml;charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        """The EC2 endpoint (boto3's ``endpoint_url``)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def metadata_url(self, instance_id: str) -> str:
        """The metadata service of one simulated instance."""
        return f"{self.url}/metadata/{instance_id}"

    def add_instance(self, zone: Optional[str] = None, instance_id: Optional[str] = None,
                     device_folder: Optional[str] = None) -> str:
        """A new running instance in ``zone`` (default: the region's first); its id (a new
        one unless ``instance_id``: an instance another service knows). Its volumes' links
        go under ``device_folder`` (made if missing) instead of the shared one."""
        instance_id = instance_id or "i-" + secrets.token_hex(8)
        if device_folder is not None:
            os.makedirs(os.path.join(device_folder, "disk", "by-id"), exist_ok=True)
        with self._lock:
            self.instances[instance_id] = FakeInstance(instance_id, zone or self.region + "a",
                                                       device_folder=device_folder)
        return instance_id

    def set_instance_state(self, instance_id: str, state: str) -> None:
        """Say an instance is ``stopped``, ``terminated`` or ``running`` (its attachments
        stay as they are: a stuck detach stays stuck)."""
        with self._lock:
            self.instances[instance_id].state = state

    def close(self) -> None:
        """Stop serving; detach every loop device it attached and remove its files."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            for volume in self.volumes.values():
                self._unplug(volume)
            for loop, path in self.forced_loops:
                release_loop_device(loop, path)
        shutil.rmtree(self.root)

    def lose_devices(self) -> None:
        """Detach every volume behind the agents' backs (an operator, a terminated
        instance): EC2 reports them available, their tags untouched."""
        with self._lock:
            for volume in self.volumes.values():
                if volume.attachment is not None:
                    self._unplug(volume)
                    volume.attachment, volume.state = None, "available"

    # The metadata service.

    def _metadata(self, handler, method: str) -> None:
        parts = handler.path.split("/", 3)  # "", "metadata", instance, rest
        instance = self.instances.get(parts[2]) if len(parts) == 4 else None
        rest = parts[3] if instance else ""
        if method == "PUT" and rest == "latest/api/token" and \
                handler.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            token = secrets.token_hex(16)
            self.tokens.add(token)
            return _send(handler, 200, token)
        if method != "GET" or not instance:
            return _send(handler, 404 if instance is None else 405, "")
        if handler.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            return _send(handler, 401, "")
        expiration = (datetime.datetime.now(datetime.timezone.utc)
                      + datetime.timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
        answers = {
            "latest/meta-data/instance-id": instance.instance_id,
            "latest/meta-data/placement/availability-zone": instance.zone,
            "latest/meta-data/placement/region": self.region,
            "latest/meta-data/iam/security-credentials/": "pyflock-agent",
            "latest/meta-data/iam/security-credentials/pyflock-agent": json.dumps({
                "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAFAKE",
                "SecretAccessKey": "fake-secret", "Token": "fake-session",
                "Expiration": expiration, "LastUpdated": expiration}),
        }
        if rest not in answers:
            return _send(handler, 404, "")
        _send(handler, 200, answers[rest])

    # The EC2 query protocol.

    def answer(self, params: dict) -> tuple[int, str]:
        """The HTTP status and XML body answering one EC2 request."""
        action = params.get("Action", "")
        with self._lock:
            self.requests.append(params)
            try:
                every = self.settings.throttle_every
                if every and len(self.requests) % every == 0:
                    raise EC2Refusal("RequestLimitExceeded", "Request limit exceeded.", 503)
                handler = getattr(self, "_" + action, None)
                if handler is None:
                    raise EC2Refusal("InvalidAction", f"{action} is not known here")
                self._advance()
                element = ET.Element(f"{action}Response", xmlns=_NS)
                _sub(element, "requestId", secrets.token_hex(8))
                handler(params, element)
                return 200, ET.tostring(element, encoding="unicode")
            except EC2Refusal as e:
                return e.status, _error(e)

    def _CreateVolume(self, p: dict, out: ET.Element) -> None:
        token = p.get("ClientToken")
        size = int(p["Size"])
        zone = p["AvailabilityZone"]
        parameters = {k: p[k] for k in ("VolumeType", "Iops", "Throughput", "Encrypted",
                                        "KmsKeyId") if k in p}
        if token in self._client_tokens:
            volume = self.volumes.get(self._client_tokens[token])
            if volume is None or (volume.size, volume.zone, volume.parameters) != \
                    (size, zone, parameters):
                raise EC2Refusal("IdempotentParameterMismatch",
                                 "the client token was used with other parameters")
            return self._volume_xml(volume, out, top=True)
        volume_id = "vol-" + secrets.token_hex(9)[:17]
        path = os.path.join(self.root, "volumes", volume_id + ".img")
        with open(path, "wb") as f:
            f.truncate(size * _GiB)
        tags = {t["Key"]: t["Value"] for t in _indexed(p, "TagSpecification.1.Tag")}
        volume = FakeVolume(volume_id, size, zone, parameters, tags, self.clock(), path)
        self.volumes[volume_id] = volume
        if token:
            self._client_tokens[token] = volume_id
        self._volume_xml(volume, out, top=True)

    def _DescribeVolumes(self, p: dict, out: ET.Element) -> None:
        ids = [v for k, v in p.items() if k.startswith("VolumeId.")]
        visible = {i: v for i, v in self.volumes.items()
                   if self.clock() >= v.created + self.settings.visibility_delay}
        for volume_id in ids:
            if volume_id not in visible:
                raise EC2Refusal("InvalidVolume.NotFound",
                                 f"The volume '{volume_id}' does not exist.")
        filters = _filters(p)
        items = _sub(out, "volumeSet")
        for volume in visible.values():
            if (not ids or volume.volume_id in ids) and self._matches(volume, filters):
                self._volume_xml(volume, _sub(items, "item"))

    def _AttachVolume(self, p: dict, out: ET.Element) -> None:
        volume = self._volume(p["VolumeId"])
        instance = self._instance(p["InstanceId"])
        device = p["Device"]
        if volume.zone != instance.zone:
            raise EC2Refusal("InvalidVolume.ZoneMismatch",
                             f"The volume '{volume.volume_id}' is not in the same "
                             f"availability zone as instance '{instance.instance_id}'")
        if volume.state != "available":
            raise EC2Refusal("IncorrectState" if volume.state == "creating" else "VolumeInUse",
                             f"vol '{volume.volume_id}' is {volume.state}")
        taken = [v.attachment.device for v in self.volumes.values()
                 if v.attachment and v.attachment.instance_id == instance.instance_id]
        if device_letters(device) in {device_letters(d) for d in taken + ["/dev/xvda"]}:
            raise EC2Refusal("InvalidParameterValue",
                             f"Invalid value '{device}' for unixDevice. Attachment point "
                             f"{device} is already in use")
        if len(taken) + 1 >= self.settings.attachment_limit:
            raise EC2Refusal("AttachmentLimitExceeded",
                             f"instance {instance.instance_id} has too many attachments")
        volume.attachment = FakeAttachment(instance.instance_id, device, "attaching",
                                           self.clock())
        volume.state = "in-use"
        self._attachment_xml(volume, out)

    def _DetachVolume(self, p: dict, out: ET.Element) -> None:
        volume = self._volume(p["VolumeId"])
        attachment = volume.attachment
        if p.get("Force") == "true" and attachment is not None:
            # The device is yanked from the instance at once, whatever holds it (a loop
            # device can only be marked to go when its last user lets go).
            self._unplug(volume)
            if attachment.loop is not None:
                self.forced_loops.append((attachment.loop, volume.path))
            attachment.state = "detaching"
            self._attachment_xml(volume, out)
            volume.attachment, volume.state = None, "available"
            return
        if attachment is None or attachment.state == "detaching":
            raise EC2Refusal("IncorrectState",
                             f"Volume '{volume.volume_id}' is in the "
                             f"'{'available' if attachment is None else 'detaching'}' state.")
        if p.get("InstanceId") not in (None, attachment.instance_id):
            raise EC2Refusal("InvalidAttachment.NotFound", "not attached to that instance")
        attachment.state, attachment.since = "detaching", self.clock()
        self._attachment_xml(volume, out)

    def _DeleteVolume(self, p: dict, out: ET.Element) -> None:
        volume = self._volume(p["VolumeId"])
        if volume.attachment is not None:
            raise EC2Refusal("VolumeInUse", f"Volume {volume.volume_id} is currently attached")
        volume.state = "deleting"
        _sub(out, "return", "true")

    def _CreateTags(self, p: dict, out: ET.Element) -> None:
        for key in [k for k in p if k.startswith("ResourceId.")]:
            volume = self._volume(p[key])
            volume.tags.update({t["Key"]: t.get("Value", "") for t in _indexed(p, "Tag")})
        _sub(out, "return", "true")

    def _DeleteTags(self, p: dict, out: ET.Element) -> None:
        for key in [k for k in p if k.startswith("ResourceId.")]:
            volume = self._volume(p[key])
            for tag in _indexed(p, "Tag"):
                # Given with a value, a tag is deleted only if its value matches.
                if "Value" not in tag or volume.tags.get(tag["Key"]) == tag["Value"]:
                    volume.tags.pop(tag["Key"], None)
        _sub(out, "return", "true")

    def _DescribeInstances(self, p: dict, out: ET.Element) -> None:
        ids = [v for k, v in p.items() if k.startswith("InstanceId.")] or list(self.instances)
        reservation = _sub(_sub(out, "reservationSet"), "item")
        _sub(reservation, "reservationId", "r-0fake")
        _sub(reservation, "ownerId", "123456789012")
        instances = _sub(reservation, "instancesSet")
        for instance_id in ids:
            instance = self._instance(instance_id)
            item = _sub(instances, "item")
            _sub(item, "instanceId", instance_id)
            state = _sub(item, "instanceState")
            _sub(state, "code", {"running": "16", "stopped": "80"}.get(instance.state, "48"))
            _sub(state, "name", instance.state)
            _sub(_sub(item, "placement"), "availabilityZone", instance.zone)
            _sub(item, "rootDeviceName", "/dev/xvda")
            mappings = _sub(item, "blockDeviceMapping")
            root = _sub(mappings, "item")
            _sub(root, "deviceName", "/dev/xvda")
            for volume in self.volumes.values():
                a = volume.attachment
                if a and a.instance_id == instance_id and a.state == "attached":
                    mapping = _sub(mappings, "item")
                    _sub(mapping, "deviceName", a.device)
                    ebs = _sub(mapping, "ebs")
                    _sub(ebs, "volumeId", volume.volume_id)
                    _sub(ebs, "status", a.state)

    # The state machine, advanced when a request comes.

    def _advance(self) -> None:
        now = self.clock()
        s = self.settings
        for volume in list(self.volumes.values()):
            a = volume.attachment
            if volume.state == "creating" and now >= volume.created + s.create_delay:
                volume.state = "available"
            elif volume.state == "deleting":
                del self.volumes[volume.volume_id]
                os.unlink(volume.path)
            elif a is not None and a.state == "attaching" and now >= a.since + s.attach_delay:
                self._plug(volume)
                a.state = "attached"
            elif a is not None and a.state == "detaching" and now >= a.since + s.detach_delay:
                if not a.released:
                    release_loop_device(a.loop, volume.path)
                    a.released = True
                if a.loop is None or _backing_file(a.loop) != volume.path:
                    self._unplug(volume)
                    volume.attachment, volume.state = None, "available"

    def _plug(self, volume: FakeVolume) -> None:
        loop = run_command(["losetup", "-f", "--show", volume.path]).strip()
        volume.attachment.loop = loop
        os.symlink(loop, self._link(volume))

    def _unplug(self, volume: FakeVolume) -> None:
        a = volume.attachment
        if a is None:
            return
        if a.loop is not None:
            release_loop_device(a.loop, volume.path)
        try:
            os.unlink(self._link(volume))
        except FileNotFoundError:
            pass

    def _link(self, volume: FakeVolume) -> str:
        instance = self.instances.get(volume.attachment.instance_id)
        folder = (instance and instance.device_folder) or self.device_folder
        return os.path.join(folder, "disk", "by-id",
                            BY_ID_PREFIX + nvme_serial(volume.volume_id))

    # Answers.

    def _volume(self, volume_id: str) -> FakeVolume:
        volume = self.volumes.get(volume_id)
        if volume is None or volume.state == "deleting":
            raise EC2Refusal("InvalidVolume.NotFound", f"The volume '{volume_id}' does not exist.")
        return volume

    def _instance(self, instance_id: str) -> FakeInstance:
        if instance_id not in self.instances:
            raise EC2Refusal("InvalidInstanceID.NotFound",
                             f"The instance ID '{instance_id}' does not exist")
        return self.instances[instance_id]

    def _matches(self, volume: FakeVolume, filters: list) -> bool:
        for name, values in filters:
            if name.startswith("tag:"):
                value = volume.tags.get(name[4:])
            elif name == "attachment.instance-id":
                value = self._reported(volume)[1] and self._reported(volume)[1].instance_id
            elif name == "status":
                value = self._reported(volume)[0]
            else:
                raise EC2Refusal("InvalidParameterValue", f"filter {name} is not known here")
            if value not in values:
                return False
        return True

    def _reported(self, volume: FakeVolume) -> tuple:
        """The state and attachment a description shows: an attach or detach shows only
        ``report_delay`` after it was asked for (eventual consistency)."""
        a = volume.attachment
        if a is None or self.clock() >= a.since + self.settings.report_delay:
            return volume.state, a
        if a.state == "attaching":
            return "available", None
        return volume.state, attr.evolve(a, state="attached")

    def _volume_xml(self, volume: FakeVolume, item: ET.Element, top: bool = False) -> None:
        state, attachment = self._reported(volume)
        _sub(item, "volumeId", volume.volume_id)
        _sub(item, "size", str(volume.size))
        _sub(item, "availabilityZone", volume.zone)
        _sub(item, "status", state)
        _sub(item, "createTime", "2026-01-01T00:00:00.000Z")
        _sub(item, "volumeType", volume.parameters.get("VolumeType", "gp2"))
        _sub(item, "encrypted", str(volume.parameters.get("Encrypted", "false")).lower())
        if "Iops" in volume.parameters:
            _sub(item, "iops", volume.parameters["Iops"])
        attachments = _sub(item, "attachmentSet")
        if attachment is not None and not top:
            a = _sub(attachments, "item")
            for tag, value in [("volumeId", volume.volume_id),
                               ("instanceId", attachment.instance_id),
                               ("device", attachment.device), ("status", attachment.state),
                               ("deleteOnTermination", "false")]:
                _sub(a, tag, value)
        tags = _sub(item, "tagSet")
        for key, value in sorted(volume.tags.items()):
            t = _sub(tags, "item")
            _sub(t, "key", key)
            _sub(t, "value", value)

    def _attachment_xml(self, volume: FakeVolume, out: ET.Element) -> None:
        a = volume.attachment
        for tag, value in [("volumeId", volume.volume_id), ("instanceId", a.instance_id),
                           ("device", a.device), ("status", a.state)]:
            _sub(out, tag, value)


def _send(handler, status: int, text: str) -> None:
    data = text.encode()
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _sub(parent: ET.Element, tag: str, text: Optional[str] = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def _error(e: EC2Refusal) -> str:
    response = ET.Element("Response")
    error = _sub(_sub(response, "Errors"), "Error")
    _sub(error, "Code", e.code)
    _sub(error, "Message", e.message)
    _sub(response, "RequestID", secrets.token_hex(8))
    return ET.tostring(response, encoding="unicode")


def _indexed(params: dict, prefix: str) -> list[dict]:
    """``Prefix.N.Field`` parameters as a list of ``{Field: value}`` by N."""
    found: dict = {}
    for key, value in params.items():
        if key.startswith(prefix + "."):
            index, _, field = key[len(prefix) + 1:].partition(".")
            if index.isdigit() and field and "." not in field:
                found.setdefault(int(index), {})[field] = value
    return [found[i] for i in sorted(found)]


def _filters(params: dict) -> list[tuple[str, list]]:
    filters: dict = {}
    for key, value in params.items():
        if key.startswith("Filter."):
            parts = key.split(".")
            entry = filters.setdefault(int(parts[1]), {"name": None, "values": []})
            if parts[2] == "Name":
                entry["name"] = value
            elif parts[2] == "Value":
                entry["values"].append(value)
    return [(f["name"], f["values"]) for _, f in sorted(filters.items())]

