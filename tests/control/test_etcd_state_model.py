"""
The shared cluster state's pure core (``control/_etcd_state_model.py``): reports encoded
and decoded, the requests that claim, publish and withdraw them, the judging of what the
watch tells, and the body of ``GET /v1/state/control``.
"""

from __future__ import annotations

import base64
import json

import pytest

from pyflock.common._jsonread import Malformed
from pyflock.common._records import DatasetReport
from pyflock.control._clusterstate import NodeState
from pyflock.control._etcd_model import Keys
from pyflock.control._etcd_state_model import (
    DEAD, IGNORE, LOST, REMOTE, VANISHED, ReplicaInfo, ReportEvent, claim_request,
    claimed_elsewhere, control_status, death_request, decode_replica, decode_report,
    encode_death, encode_report, forget_request, judge,
    leader_name, member_json, publish_request, range_events, read_watch_line,
    replica_request, resync_events, watch_request, withdraw_outcome, withdraw_request,
)

KEYS = Keys.under("/p/")
A = "aaaaaaaa-0000-4000-8000-000000000001"
DS = "11111111-2222-4333-8444-555555555555"
NODE = NodeState(uuid=A, host="10.0.0.5", era="e1", last_seen=5.0, peer_port=4525,
                 zone="z1", datasets={DS: DatasetReport(DS, "mounted", "/m/x", 1 << 26, A)})


def b64(data: bytes) -> str:
    """``data`` as the gateway carries it."""
    return base64.b64encode(data).decode()


def test_report_round_trip():
    """A report decodes to the node encoded, marked remote, heard from when decoded."""
    decoded = decode_report(A, encode_report("c1", NODE), seen=42.0)
    assert decoded == NODE.set(remote="c1", last_seen=42.0)


def test_report_holds_no_time_or_heartbeat():
    """A report's value does not change with the node's last_seen (heartbeats)."""
    assert encode_report("c1", NODE) == encode_report("c1", NODE.set(last_seen=999.0))


@pytest.mark.parametrize("value, words", [
    (b"not json", "not JSON"),
    (b"[]", "must be an object"),
    (json.dumps({"replica": "c1", "host": "h", "era": None, "peer_port": None,
                 "zone": None, "datasets": [{"dataset_id": DS, "state": "bogus"}]}).encode(),
     "state must be one of"),
])
def test_unreadable_report_refused(value, words):
    """A report that cannot be read is refused saying what is wrong."""
    with pytest.raises(Malformed, match=words):
        decode_report(A, value, seen=0.0)


@pytest.mark.parametrize("event, lease, owned, remote, verdict", [
    (ReportEvent(A, 10, 7, b"x"), 7, 9, False, IGNORE),      # its own put
    (ReportEvent(A, 8, 5, b"x"), 7, 9, False, IGNORE),       # older than its own claim
    (ReportEvent(A, 10, 5, b"x"), 7, 9, False, REMOTE),      # another replica claimed since
    (ReportEvent(A, 10, 5, b"x"), 7, None, False, REMOTE),   # another replica's node
    (ReportEvent(A, 10), 7, None, True, VANISHED),           # that replica withdrew or died
    (ReportEvent(A, 10), 7, None, False, IGNORE),            # its own withdrawal
    (ReportEvent(A, 10), 7, 9, False, LOST),                 # its own key gone: lease lost
    (ReportEvent(A, 8), 7, 9, False, IGNORE),                # a delete before its claim
])
def test_judge(event, lease, owned, remote, verdict):
    """Each report event is judged by lease, the replica's own last write, and remoteness."""
    assert judge(event, lease, owned, remote) == verdict


def test_claim_puts_whatever_the_key_holds():
    """A claim is a put bound to the lease, with no compare."""
    request = claim_request(KEYS, "c1", NODE, 77)
    assert request["compare"] == []
    put = request["success"][0]["request_put"]
    assert (put["key"], put["lease"]) == (b64(KEYS.report(A)), "77")
    assert base64.b64decode(put["value"]) == encode_report("c1", NODE)


def test_publish_and_withdraw_compare_the_lease():
    """A publish and a withdrawal happen only while the key is bound to the lease."""
    for request in (publish_request(KEYS, "c1", NODE, 77), withdraw_request(KEYS, A, 77)):
        assert request["compare"] == [{"key": b64(KEYS.report(A)), "target": "LEASE",
                                       "result": "EQUAL", "lease": "77"}]
    assert "request_delete_range" in withdraw_request(KEYS, A, 77)["success"][0]


def test_claimed_elsewhere():
    """A refused publish that read a key was claimed elsewhere; one that read none was not."""
    assert claimed_elsewhere({"responses": [{"response_range": {"kvs": [{"key": "x"}]}}]})
    assert not claimed_elsewhere({"responses": [{"response_range": {}}]})


def test_range_and_resync_events():
    """A full read gives a put per report and a delete for each known node not found."""
    answer = {"header": {"revision": "20"}, "kvs": [
        {"key": b64(KEYS.report(A)), "value": b64(b"v"), "mod_revision": "12",
         "lease": "5"}]}
    revision, events = range_events(KEYS, answer)
    assert (revision, events) == (20, [ReportEvent(A, 12, 5, b"v")])
    assert resync_events(events, {A, "gone"}, revision) == [
        ReportEvent(A, 12, 5, b"v"), ReportEvent("gone", 20)]


def test_watch_lines():
    """Watch lines decode to puts and deletes, cancellations and errors."""
    assert watch_request(KEYS, 9)["create_request"]["start_revision"] == "9"
    line = json.dumps({"result": {"header": {"revision": "31"}, "events": [
        {"kv": {"key": b64(KEYS.report(A)), "value": b64(b"v"), "mod_revision": "30",
                "lease": "3"}},
        {"type": "DELETE", "kv": {"key": b64(KEYS.report("b")), "mod_revision": "31"}}]}})
    message = read_watch_line(KEYS, line.encode())
    assert message.kind == "events" and message.revision == 31
    assert message.events == (ReportEvent(A, 30, 3, b"v"), ReportEvent("b", 31))
    canceled = read_watch_line(KEYS, b'{"result": {"canceled": true, "compact_revision": "8"}}')
    assert (canceled.kind, canceled.revision) == ("canceled", 8)
    assert read_watch_line(KEYS, b'{"error": {"message": "no leader"}}').reason == "no leader"
    assert read_watch_line(KEYS, b'{"result": {"created": true}}').kind == "created"


def test_replica_announcement_round_trip():
    """A replica's announcement is a put bound to its lease and reads back."""
    replica = ReplicaInfo("c1", "host1:4523", 12.5)
    put = replica_request(KEYS, replica, 9)["success"][0]["request_put"]
    assert put["lease"] == "9"
    assert decode_replica(base64.b64decode(put["value"])) == replica
    assert decode_replica(b"junk") is None


def test_leader_is_the_oldest_campaign_key():
    """The leader is the candidate with the lowest create revision, JSON or text."""
    kvs = [{"value": b64(b'{"name": "c2"}'), "create_revision": "9"},
           {"value": b64(b"c1"), "create_revision": "4"}]
    assert leader_name(kvs) == "c1"
    assert leader_name(kvs[:1]) == "c2"
    assert leader_name([]) is None


def test_control_status_body():
    """The status names the replicas in order, marks the leader and lists the members."""
    body = control_status("c2", "etcd", [ReplicaInfo("c2", "h2:1", 2.0),
                                         ReplicaInfo("c1", "h1:1", 1.0)], "c1",
                          [member_json({"ID": "7", "name": "m0", "clientURLs": ["u"],
                                        "peerURLs": ["p"]})])
    assert body == {"store": "etcd", "replica": "c2", "leader": "c1", "replicas": [
        {"name": "c1", "address": "h1:1", "since": 1.0, "leader": True},
        {"name": "c2", "address": "h2:1", "since": 2.0, "leader": False}],
        "etcd_members": [{"id": "7", "name": "m0", "client_urls": ["u"],
                          "peer_urls": ["p"]}]}
    assert control_status("c", "etcd", [], None, None, "down")["etcd_error"] == "down"


@pytest.mark.parametrize("port, address", [
    ("4523", "HOST:4523"), ("tcp:4600", "HOST:4600"),
    ("tcp:4601:interface=127.0.0.9", "127.0.0.9:4601")])
def test_replica_name_and_address(port, address, monkeypatch):
    """A replica is named after the host and the API port unless named, and its address
    is the endpoint's interface (else the host's name) with the port."""
    import argparse
    import socket
    from pyflock.control._stores import replica_address, replica_name
    monkeypatch.setattr(socket, "gethostname", lambda: "HOST")
    monkeypatch.setattr(socket, "getfqdn", lambda: "HOST")
    options = argparse.Namespace(port=port, replica_name=None)
    assert replica_address(options) == address
    assert replica_name(options) == "HOST:" + address.split(":")[1]
    assert replica_name(argparse.Namespace(port=port, replica_name="c7")) == "c7"


def test_death_marks_are_told_apart_from_reports():
    """A watch line over ``P state/`` tells a report's put from the leader's death mark,
    and a full read yields the deletes of vanished nodes before the marks."""
    def kv(key: bytes, value: bytes = b"") -> dict:
        return {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode(),
                "mod_revision": "7"}
    line = json.dumps({"result": {"header": {"revision": "7"}, "events": [
        {"kv": kv(KEYS.report("n1"), b"{}")}, {"kv": kv(KEYS.death("n2"), b"5")}]}})
    events = read_watch_line(KEYS, line.encode()).events
    assert [(e.node_uuid, e.death) for e in events] == [("n1", False), ("n2", True)]
    revision, present = range_events(KEYS, {"header": {"revision": "9"}, "kvs": [
        kv(KEYS.death("n2"), b"5")]})
    assert [(e.node_uuid, e.death, e.value) for e in resync_events(present, ["n2"], 9)] == [
        ("n2", False, None), ("n2", True, b"5")]
    # A mark seen before and no longer there (deleted while the watch was compacted).
    assert [(e.node_uuid, e.death, e.value, e.revision)
            for e in resync_events(present, [], 9, ["n2", "n3"])] == [
        ("n2", True, b"5", 7), ("n3", True, None, 9)]


def test_death_request_needs_the_report_absent():
    """The leader's mark compares the report's create revision with 0 (absent), and a
    claim deletes the mark."""
    request = death_request(KEYS, "n1", b"mark")
    assert request["compare"] == [{"key": base64.b64encode(KEYS.report("n1")).decode(),
                                   "target": "CREATE", "result": "EQUAL",
                                   "create_revision": "0"}]
    put = request["success"][0]["request_put"]
    assert (base64.b64decode(put["key"]), base64.b64decode(put["value"])) == (
        KEYS.death("n1"), b"mark")
    claim = claim_request(KEYS, "c1", NodeState(uuid="n1", host="h", last_seen=0.0), 3)
    assert base64.b64decode(claim["success"][1]["request_delete_range"]["key"]) == \
        KEYS.death("n1")


def test_death_mark_describes_the_node_without_datasets():
    """The leader's mark holds the node as its replica last published it, holding nothing,
    and the revision its report vanished at; it reads back as a report."""
    mark = encode_death("c1", NODE, 12)
    assert json.loads(mark)["vanished"] == 12
    assert decode_report(A, mark, seen=42.0) == NODE.set(remote="c1", last_seen=42.0,
                                                         datasets={})


@pytest.mark.parametrize("answer, outcome", [
    ({"succeeded": True}, VANISHED),                                  # deleted
    ({"responses": [{"response_range": {"kvs": [{"key": "r"}]}},
                    {"response_range": {}}]}, REMOTE),                # claimed elsewhere
    ({"responses": [{"response_range": {}},
                    {"response_range": {"kvs": [{"key": "d"}]}}]}, DEAD),  # gone, marked
    ({"responses": [{"response_range": {}}, {"response_range": {}}]}, VANISHED),  # gone
])
def test_withdraw_outcome(answer, outcome):
    """A withdrawal's answer tells whether the node waits for its mark, was claimed by
    another replica, or is marked dead already."""
    assert withdraw_outcome(answer) == outcome


def test_forget_deletes_the_death_mark():
    """Forgetting a node deletes its death mark, with no compare."""
    request = forget_request(KEYS, A)
    assert request["compare"] == []
    assert base64.b64decode(request["success"][0]["request_delete_range"]["key"]) == \
        KEYS.death(A)
