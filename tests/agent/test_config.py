"""agent.yml validation and the node's era."""

import pytest

from pyflock.agent._config import (
    DEFAULT_SIZE, ConfigError, compute_era, load_config, parse_config,
)

MINIMAL = {"version": 1, "control-service": {"hostname": "control.example"},
           "dataset": {"backend": "loopback"}}


def test_minimal_defaults():
    """A minimal file gets DESIGN.md's defaults for every other key."""
    config = parse_config(MINIMAL)
    assert (config.control_port, config.control_api_port, config.certificates,
            config.data_path, config.mount_root, config.peer_port, config.plugin_socket,
            config.default_size, config.backend_options) == (
        4524, 4523, "/etc/pyflock", "/var/lib/pyflock", "/var/lib/pyflock/mounts", 4525,
        "/run/docker/plugins/pyflock.sock", DEFAULT_SIZE,
        {"root_path": "/var/lib/pyflock/loopback"})


def test_full_file(tmp_path):
    """Every key is read from the file, sizes in binary units."""
    path = tmp_path / "agent.yml"
    path.write_text("""
version: 1
control-service: {hostname: 127.0.0.1, port: 14524, api-port: 14523}
certificates: /c
data-path: /d
mount-root: /m
node: {address: 127.0.0.11, peer-port: 14525}
dataset: {backend: loopback, root_path: /l, default_size: 1G}
plugin: {socket: /s.sock}
""")
    config = load_config(str(path))
    assert (config.control_hostname, config.control_port, config.control_api_port,
            config.address, config.peer_port, config.default_size, config.plugin_socket,
            config.backend_options, config.mount_root, config.state_path) == (
        "127.0.0.1", 14524, 14523, "127.0.0.11", 14525, 1024 ** 3, "/s.sock",
        {"root_path": "/l"}, "/m", "/d/agent")


def test_control_replicas_list():
    """``control-service.hostname`` may list the replicas; one name is a list of one."""
    config = parse_config({**MINIMAL, "control-service": {
        "hostname": ["c1.example", "10.0.0.2", "c3.example"], "port": 14524}})
    assert (config.control_hostnames, config.control_hostname, config.control_port) == (
        ("c1.example", "10.0.0.2", "c3.example"), "c1.example", 14524)
    assert parse_config(MINIMAL).control_hostnames == ("control.example",)


def test_ebs_needs_no_zone():
    """The ebs backend needs no key: zone and region come from the instance metadata."""
    config = parse_config({**MINIMAL, "dataset": {"backend": "ebs"}})
    assert (config.backend, config.backend_options) == ("ebs", {})
    full = {"backend": "ebs", "region": "eu-west-1", "encrypted": True, "kms_key_id": "k",
            "attachment_limit": 20, "endpoint_url": "http://127.0.0.1:1",
            "metadata_url": "http://127.0.0.1:2/metadata/i-1", "device_folder": "/tmp/dev"}
    config = parse_config({**MINIMAL, "dataset": full})
    assert config.backend_options == {k: v for k, v in full.items() if k != "backend"}


def test_btrfs_pool():
    """The btrfs backend reads ``pool_path`` and ``pool_size`` (binary units)."""
    config = parse_config({**MINIMAL, "dataset": {"backend": "btrfs", "pool_path": "/p.img",
                                                  "pool_size": "20G"}})
    assert (config.backend, config.backend_options) == (
        "btrfs", {"pool_path": "/p.img", "pool_size": 20 * 1024 ** 3})


@pytest.mark.parametrize("change, message", [
    ({"dataset": {"backend": "btrfs", "pool": "/x"}}, "dataset.pool: this key is now called "
                                                      "pool_path"),
    ({"dataset": {"backend": "btrfs"}}, "'pool_path' is a required property"),
    ({"dataset": {"backend": "btrfs", "pool_path": "/x", "pool_size": "big"}},
     "dataset.pool_size: not a size"),
    ({"dataset": {"backend": "zfs"}}, "dataset.backend: 'zfs' is not one of"),
    ({"version": 2}, "version: 1 was expected"),
    ({"control-service": {"port": 4524}}, "'hostname' is a required property"),
    ({"control-service": {"hostname": "x", "port": 70000}}, "control-service.port"),
    ({"data-path": "relative"}, "data-path: 'relative' must be an absolute path"),
    ({"dataset": {"backend": "loopback", "pool": "/x"}}, "'pool' was unexpected"),
    ({"dataset": {"backend": "ebs", "zone": "us-east-1a"}}, "'zone' was unexpected"),
    ({"dataset": {"backend": "ebs", "endpoint_url": "ftp://x"}}, "dataset.endpoint_url"),
    ({"dataset": {"backend": "ebs", "attachment_limit": 1}}, "dataset.attachment_limit"),
    ({"dataset": {"backend": "loopback", "default_size": "lots"}}, "dataset.default_size"),
    ({"surprise": 1}, "'surprise' was unexpected"),
    ({"control-service": {"hostname": []}}, "control-service.hostname: .* must be a host "
                                            "name or a list of distinct host names"),
    ({"control-service": {"hostname": ["a", "a"]}}, "list of distinct host names"),
    ({"control-service": {"hostname": ["a", "b c"]}}, "control-service.hostname: 'b c' must "
                                                      "be an IP address or a host name"),
    ({"node": {"address": "my host"}}, "node.address: 'my host' must be an IP address or a "
                                       "host name"),
])
def test_bad_file_names_key(change, message):
    """A bad key is refused with the key and the reason."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config({**MINIMAL, **change})


def test_not_yaml(tmp_path):
    """A file that is not YAML, or missing, is refused naming the file."""
    path = tmp_path / "agent.yml"
    path.write_text("version: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yml"))


def test_era_per_boot_and_node():
    """The era changes with the boot id and differs between nodes on one host."""
    a = "aaaaaaaa-0000-4000-8000-000000000001"
    b = "bbbbbbbb-0000-4000-8000-000000000002"
    assert compute_era("boot1", a) == compute_era("boot1", a)
    assert len({compute_era("boot1", a), compute_era("boot2", a), compute_era("boot1", b)}) == 3


def test_peer_transfer_limits():
    """The peer transfer limits default to no bandwidth limit and 2 transfers at once;
    a bandwidth is a size per second."""
    config = parse_config(MINIMAL)
    assert (config.peer_bandwidth, config.peer_transfers) == (None, 2)
    config = parse_config({**MINIMAL, "node": {"peer-bandwidth": "100M",
                                               "peer-transfers": 4}})
    assert (config.peer_bandwidth, config.peer_transfers) == (100 * 1024 ** 2, 4)


@pytest.mark.parametrize("node, message", [
    ({"peer-bandwidth": "fast"}, "node.peer-bandwidth"),
    ({"peer-transfers": 0}, "node.peer-transfers: 0 is less than"),
])
def test_bad_peer_transfer_limits(node, message):
    """A bandwidth that is no size, or fewer than one transfer, is refused naming the key."""
    with pytest.raises(ConfigError, match=message):
        parse_config({**MINIMAL, "node": node})


def test_plugin_mount_timeout():
    """The Docker plugin's time budget for a Mount is 100 s unless ``plugin.mount-timeout``
    says otherwise (tests cut it); more than 110 s, or none, is refused: dockerd gives up
    at 120 s."""
    assert parse_config(MINIMAL).mount_timeout == 100
    assert parse_config({**MINIMAL, "plugin": {"mount-timeout": 2.5}}).mount_timeout == 2.5
    for bad in (0, 111, "soon"):
        with pytest.raises(ConfigError, match="plugin.mount-timeout"):
            parse_config({**MINIMAL, "plugin": {"mount-timeout": bad}})
