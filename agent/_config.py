"""
``agent.yml``: read and validated once, at start, into typed values.

A bad file is refused with the key and the reason (``dataset.backend: 'zfs' is not one of
['loopback', 'btrfs', 'ebs']``); everything after this module works with ``AgentConfig``.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Optional

import attr
import yaml
from jsonschema import Draft202012Validator

from pyflock.agent._plugin_model import MOUNT_TIMEOUT
from pyflock.common._jsonread import is_host
from pyflock.common._sizes import parse_size

DEFAULT_CERTIFICATES = "/etc/pyflock"
DEFAULT_DATA_PATH = "/var/lib/pyflock"
DEFAULT_SOCKET = "/run/docker/plugins/pyflock.sock"
DEFAULT_DOCKER_SOCKET = "/run/docker.sock"
DEFAULT_LOOPBACK_ROOT = "/var/lib/pyflock/loopback"
DEFAULT_SIZE = 10 * 1024 ** 3
#: The longest ``plugin.mount-timeout``: a Mount must answer before dockerd gives up (120 s).
MOUNT_TIMEOUT_LIMIT = 110

_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_PATH = {"type": "string", "minLength": 1, "pattern": "^/"}
_SIZE = {"type": ["string", "integer"]}
_URL = {"type": "string", "pattern": "^https?://"}
_HOST = {"type": "string", "minLength": 1}

#: The ebs backend's ``wait_limits``: seconds each wait may last (``WaitLimits``).
_WAIT_LIMITS = {"type": "object", "additionalProperties": False,
                "properties": {name: {"type": "number", "exclusiveMinimum": 0}
                               for name in ("created", "attached", "detached", "deleted",
                                            "device", "interval")}}

SCHEMA = {
    "type": "object",
    "required": ["version", "control-service", "dataset"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": 1},
        "control-service": {
            "type": "object", "required": ["hostname"], "additionalProperties": False,
            "properties": {"hostname": {"oneOf": [_HOST, {
                               "type": "array", "items": _HOST, "minItems": 1,
                               "uniqueItems": True}]},
                           "port": _PORT, "api-port": _PORT}},
        "certificates": _PATH,
        "data-path": _PATH,
        "mount-root": _PATH,
        "node": {"type": "object", "additionalProperties": False,
                 "properties": {"address": {"type": "string", "minLength": 1},
                                "peer-port": _PORT,
                                # Bytes per second per transfer ("100M"), or no limit.
                                "peer-bandwidth": _SIZE,
                                "peer-transfers": {"type": "integer", "minimum": 1}}},
        "dataset": {
            "type": "object", "required": ["backend"],
            "properties": {"backend": {"enum": ["loopback", "btrfs", "ebs"]}},
            "allOf": [
                {"if": {"properties": {"backend": {"const": "loopback"}}},
                 "then": {"properties": {"backend": True, "root_path": _PATH,
                                         "default_size": _SIZE},
                          "additionalProperties": False}},
                {"if": {"properties": {"backend": {"const": "btrfs"}}},
                 "then": {"required": ["pool_path"],
                          "properties": {"backend": True, "pool_path": _PATH,
                                         "pool_size": _SIZE, "default_size": _SIZE},
                          "additionalProperties": False}},
                {"if": {"properties": {"backend": {"const": "ebs"}}},
                 "then": {"properties": {"backend": True, "default_size": _SIZE,
                                         "region": {"type": "string", "minLength": 1},
                                         "encrypted": {"type": "boolean"},
                                         "kms_key_id": {"type": "string", "minLength": 1},
                                         "attachment_limit": {"type": "integer",
                                                              "minimum": 2, "maximum": 128},
                                         # For tests: a fake EC2 and metadata service,
                                         # and shorter waits.
                                         "endpoint_url": _URL, "metadata_url": _URL,
                                         "device_folder": _PATH,
                                         "wait_limits": _WAIT_LIMITS},
                          "additionalProperties": False}},
            ]},
        "plugin": {"type": "object", "additionalProperties": False,
                   "properties": {"socket": _PATH, "docker": _PATH,
                                  # Seconds a Mount may take: under dockerd's 120 s.
                                  "mount-timeout": {"type": "number", "exclusiveMinimum": 0,
                                                    "maximum": MOUNT_TIMEOUT_LIMIT}}},
    },
}
_VALIDATOR = Draft202012Validator(SCHEMA)


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the key and why."""


@attr.s(frozen=True, auto_attribs=True)
class AgentConfig:
    """A validated ``agent.yml``; ``control_hostnames`` are the control service's replicas
    (one name, or several: issue 9)."""

    control_hostnames: tuple[str, ...]
    control_port: int = 4524
    control_api_port: int = 4523
    certificates: str = DEFAULT_CERTIFICATES
    data_path: str = DEFAULT_DATA_PATH
    mount_root: str = DEFAULT_DATA_PATH + "/mounts"
    address: Optional[str] = None
    peer_port: int = 4525
    #: The peer transfer service's limits: bytes per second per transfer (None: none),
    #: and transfers at once on this node, sending and receiving together.
    peer_bandwidth: Optional[int] = None
    peer_transfers: int = 2
    backend: str = "loopback"
    backend_options: dict = attr.ib(factory=dict)
    default_size: int = DEFAULT_SIZE
    plugin_socket: str = DEFAULT_SOCKET
    docker_socket: str = DEFAULT_DOCKER_SOCKET
    #: Seconds a Docker Mount may take before it answers with why it is not ready.
    mount_timeout: float = MOUNT_TIMEOUT

    @property
    def control_hostname(self) -> str:
        """The first control service replica's host name (for messages)."""
        return self.control_hostnames[0]

    @property
    def state_path(self) -> str:
        """Where the agent keeps its own state (view of the cluster, mount counts)."""
        return os.path.join(self.data_path, "agent")


def _refuse_renamed_keys(document) -> None:
    """``ConfigError`` for a key an earlier version read under another name."""
    dataset = document.get("dataset") if isinstance(document, dict) else None
    if isinstance(dataset, dict) and dataset.get("backend") == "btrfs" and "pool" in dataset:
        raise ConfigError("dataset.pool: this key is now called pool_path (a block device, "
                          "or a file the agent creates when pool_size is given); rename it")


def parse_config(document) -> AgentConfig:
    """Validate a parsed YAML document into an ``AgentConfig`` or raise ``ConfigError``."""
    _refuse_renamed_keys(document)
    errors = sorted(_VALIDATOR.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            if e.validator == "pattern" and e.validator_value == "^/":
                lines.append(f"{where}: {e.instance!r} must be an absolute path "
                             f"(starting with /)")
            elif e.validator == "oneOf" and where == "control-service.hostname":
                lines.append(f"{where}: {e.instance!r} must be a host name or a list of "
                             f"distinct host names (one per control service replica)")
            else:
                lines.append(f"{where}: {e.message}")
        raise ConfigError("; ".join(lines))
    control = document["control-service"]
    node = document.get("node", {})
    dataset = dict(document["dataset"])
    backend = dataset.pop("backend")
    try:
        default_size = parse_size(str(dataset.pop("default_size", DEFAULT_SIZE)))
    except ValueError as e:
        raise ConfigError(f"dataset.default_size: {e}")
    if node.get("address") is not None and not is_host(node["address"]):
        raise ConfigError(f"node.address: {node['address']!r} must be an IP address or a "
                          f"host name (the control service refuses anything else)")
    hostnames = control["hostname"]
    hostnames = (hostnames,) if isinstance(hostnames, str) else tuple(hostnames)
    for name in hostnames:
        if not is_host(name):
            raise ConfigError(f"control-service.hostname: {name!r} must be an IP address or "
                              f"a host name")
    data_path = document.get("data-path", DEFAULT_DATA_PATH)
    if backend == "loopback":
        dataset.setdefault("root_path", os.path.join(data_path, "loopback"))
    if backend == "btrfs" and "pool_size" in dataset:
        try:
            dataset["pool_size"] = parse_size(str(dataset["pool_size"]))
        except ValueError as e:
            raise ConfigError(f"dataset.pool_size: {e}")
    return AgentConfig(
        control_hostnames=hostnames, control_port=control.get("port", 4524),
        control_api_port=control.get("api-port", 4523),
        certificates=document.get("certificates", DEFAULT_CERTIFICATES),
        data_path=data_path,
        mount_root=document.get("mount-root", os.path.join(data_path, "mounts")),
        address=node.get("address"), peer_port=node.get("peer-port", 4525),
        peer_bandwidth=_peer_bandwidth(node), peer_transfers=node.get("peer-transfers", 2),
        backend=backend, backend_options=dataset, default_size=default_size,
        plugin_socket=document.get("plugin", {}).get("socket", DEFAULT_SOCKET),
        docker_socket=document.get("plugin", {}).get("docker", DEFAULT_DOCKER_SOCKET),
        mount_timeout=document.get("plugin", {}).get("mount-timeout", MOUNT_TIMEOUT))


def _peer_bandwidth(node: dict) -> Optional[int]:
    """``node.peer-bandwidth`` in bytes per second (None: no limit), or ``ConfigError``."""
    bandwidth = node.get("peer-bandwidth")
    try:
        return None if bandwidth is None else parse_size(str(bandwidth))
    except ValueError as e:
        raise ConfigError(f"node.peer-bandwidth: {e} (bytes per second, as 100M)")


def load_config(path: str) -> AgentConfig:
    """Read and validate the agent configuration file at ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the agent configuration ({e.strerror})")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}")
    try:
        return parse_config(document)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}")


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """The kernel's boot id: it changes at every reboot."""
    return Path(path).read_text().strip()


def compute_era(boot: str, node_uuid: str) -> str:
    """
    The era of a node: changes when the host reboots (the boot id) and differs between
    agents on one host (the node uuid). A UUID-shaped string.
    """
    digest = hashlib.sha256(f"{boot}\0{node_uuid}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))
