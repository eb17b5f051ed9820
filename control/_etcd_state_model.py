"""
Shared cluster state on etcd, the pure core (issue 9, point 3): how a replica publishes
the reports of the agents connected to it, and how it judges the reports other replicas
publish. No IO: ``control/_etcd_state.py`` sends what this module builds.

Keys (``control/_etcd_model.Keys``):

- ``P state/nodes/<uuid>``: one node's latest report, JSON ``{"replica", "host", "era",
  "peer_port", "zone", "datasets": [report, ...]}``, put by the replica the node's agent
  talks to, bound to that replica's etcd lease (so it vanishes with the replica).
- ``P replicas/<name>``: ``{"name", "address", "since"}``, bound to the same lease.
- ``P state/dead/<uuid>``: the leader's mark that a node whose report vanished is dead,
  put only while its report is still absent and the leader's fence holds: the node as it
  was last published, without datasets, and the etcd revision its report vanished at
  (``encode_death``), so that a replica that never saw the node lists it dead. Deleted by
  the next claim of the node, and by the replica that forgets the node
  (``forget_request``).

Ownership. A replica *claims* a node when its agent says hello (a put whatever the key
holds); it *publishes* a changed report only while the key is still bound to its own
lease (a compare on the key's lease), so a report that was on its way when the agent
moved to another replica cannot overwrite that replica's claim; it *withdraws* a node
that went silent by deleting the key only if still bound to its lease. What the watch
tells is judged by ``judge``: a put by another lease newer than this replica's own last
write makes the node remote; a delete of a remote node makes it vanish (dead); a delete
of a node this replica publishes, that it did not withdraw, says its lease was lost.

Death. A vanished remote node is not dead yet: only the leader marks it dead (a fenced
``death_request``), and every replica, the leader too, wipes it when the watch shows that
mark. A paused or deposed leader cannot mark a node dead; replicas never decide alone, not
even the one whose agent went silent: it withdraws the report and waits for the mark like
the others (``withdraw_outcome`` reads what its withdrawal found).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import attr
from pyrsistent import pmap

from pyflock.common._jsonread import (
    Malformed, as_object, read, read_list, read_number, read_port,
)
from pyflock.common._records import report_from_json, report_to_json
from pyflock.control._clusterstate import NodeState
from pyflock.control._etcd_model import (
    Keys, b64, get, prefix_end, range_request, txn, unb64,
)

#: Seconds of the etcd lease a replica's reports are bound to (``--state-lease-ttl``).
DEFAULT_STATE_LEASE_TTL = 10.0

#: The verdicts of ``judge`` (and ``DEAD``: of ``withdraw_outcome``).
IGNORE, REMOTE, VANISHED, LOST, DEAD = "ignore", "remote", "vanished", "lost", "dead"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _report_json(replica: str, node: NodeState) -> dict:
    return {"replica": replica, "host": node.host, "era": node.era,
            "peer_port": node.peer_port, "zone": node.zone,
            "datasets": [report_to_json(r) for _, r in sorted(node.datasets.items())]}


def encode_report(replica: str, node: NodeState) -> bytes:
    """The stored value of ``node``'s report, published by ``replica``."""
    return _canonical(_report_json(replica, node))


def encode_death(replica: str, node: NodeState, vanished: int) -> bytes:
    """The value of the leader's mark of ``node``'s death: its report as ``replica`` last
    published it, without datasets (a dead node holds none), read back by
    ``decode_report``, and the etcd revision the report vanished at."""
    return _canonical(dict(_report_json(replica, node.set(datasets={})), vanished=vanished))


def decode_report(node_uuid: str, value: bytes, seen: float) -> NodeState:
    """The node a stored report holds, marked remote (its publishing replica), heard from
    at ``seen``; ``Malformed`` saying what is wrong."""
    where = f"the report of node {node_uuid}"
    try:
        obj = as_object(json.loads(value), where)
    except ValueError as e:
        raise Malformed(f"{where} is not JSON: {e}") from None
    reports = [report_from_json(r, f"{where}.datasets")
               for r in read_list(obj, "datasets", where)]
    return NodeState(
        uuid=node_uuid, host=read(obj, "host", (str,), where),
        era=read(obj, "era", (str,), where, optional=True, default=None),
        peer_port=read_port(obj, "peer_port", where),
        zone=read(obj, "zone", (str,), where, optional=True, default=None),
        last_seen=seen, remote=read(obj, "replica", (str,), where),
        datasets=pmap({r.dataset_id: attr.evolve(r, node_uuid=node_uuid) for r in reports}))


@attr.s(frozen=True, auto_attribs=True)
class ReportEvent:
    """One report key as etcd tells it: the node, the etcd revision (of the put, or of
    the delete), the lease it is bound to (0: none) and its value (None: deleted)."""

    node_uuid: str
    revision: int
    lease: int = 0
    value: Optional[bytes] = None
    #: The leader's death mark of the node (``P state/dead/``), not its report.
    death: bool = False


def _event_of(keys: Keys, kv: dict, revision: int, deleted: bool) -> Optional[ReportEvent]:
    key = unb64(kv.get("key"))
    for prefix, death in ((keys.reports, False), (keys.deaths, True)):
        if key.startswith(prefix):
            return ReportEvent(key[len(prefix):].decode("utf-8", "replace"),
                               int(kv.get("mod_revision", revision) or revision),
                               int(kv.get("lease", 0) or 0),
                               None if deleted else unb64(kv.get("value")), death)
    return None


def range_events(keys: Keys, answer: dict) -> tuple[int, list[ReportEvent]]:
    """The revision of a range answer over the reports and a put event per key found."""
    revision = int(answer.get("header", {}).get("revision", 0))
    found = [_event_of(keys, kv, revision, False) for kv in answer.get("kvs", [])]
    return revision, [e for e in found if e is not None]


def resync_events(present: Iterable[ReportEvent], known: Iterable[str],
                  revision: int, marked: Iterable[str] = ()) -> list[ReportEvent]:
    """After a full read at ``revision``: the puts found, a delete for every node
    ``known`` (remote or published here) that is no longer there, and a delete for every
    death mark seen before (``marked``) that is no longer there."""
    present = list(present)
    there = {e.node_uuid for e in present if not e.death}
    reports = [e for e in present if not e.death]
    marks = [e for e in present if e.death]
    gone = set(marked) - {e.node_uuid for e in marks}
    return (reports + [ReportEvent(uuid, revision) for uuid in sorted(set(known) - there)]
            + marks + [ReportEvent(uuid, revision, death=True) for uuid in sorted(gone)])


@attr.s(frozen=True, auto_attribs=True)
class WatchLine:
    """One line of a watch of the reports: ``kind`` is ``events``, ``progress``,
    ``created``, ``canceled`` (``revision``: the compaction's, 0 if none) or ``error``."""

    kind: str
    events: tuple[ReportEvent, ...] = ()
    revision: int = 0
    reason: str = ""


def read_watch_line(keys: Keys, line: bytes) -> WatchLine:
    """Decode one line of a watch stream of the reports (``ValueError``: not JSON)."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"a watch message is not a JSON object: {line[:200]!r}")
    if "error" in message:
        error = message["error"]
        return WatchLine("error", reason=str(error.get("message", error))
                         if isinstance(error, dict) else str(error))
    result = message.get("result", {})
    if result.get("canceled"):
        return WatchLine("canceled", revision=int(result.get("compact_revision", 0)),
                         reason=str(result.get("cancel_reason", "")))
    revision = int(result.get("header", {}).get("revision", 0))
    events = tuple(e for e in (
        _event_of(keys, event.get("kv", {}), revision, event.get("type") == "DELETE")
        for event in result.get("events") or []) if e is not None)
    if events:
        return WatchLine("events", events, revision)
    return WatchLine("created" if result.get("created") else "progress", revision=revision)


def watch_request(keys: Keys, start_revision: int) -> dict:
    """The body of a ``/v3/watch`` on every report and death mark from ``start_revision``
    on."""
    return {"create_request": {"key": b64(keys.state),
                               "range_end": b64(prefix_end(keys.state)),
                               "start_revision": str(start_revision),
                               "progress_notify": True}}


def judge(event: ReportEvent, lease: int, owned: Optional[int], remote: bool) -> str:
    """
    What a report event means to a replica holding etcd lease ``lease``, whose own last
    write of this node's key was at revision ``owned`` (None: it does not publish the
    node) and which shows the node as remote (``remote``).
    """
    if event.value is not None:
        if event.lease == lease or (owned is not None and event.revision < owned):
            return IGNORE  # its own write, or one its own later claim replaced
        return REMOTE
    if owned is not None:
        return IGNORE if event.revision < owned else LOST
    return VANISHED if remote else IGNORE


# -- requests --------------------------------------------------------------------------

def _leased_put(key: bytes, value: bytes, lease: int) -> dict:
    return {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease)}}


def _same_lease(key: bytes, lease: int) -> dict:
    return {"key": b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}


def claim_request(keys: Keys, replica: str, node: NodeState, lease: int) -> dict:
    """The transaction putting ``node``'s report bound to ``lease``, whoever held it, and
    deleting the leader's mark of its death, if any."""
    return txn(success=[_leased_put(keys.report(node.uuid), encode_report(replica, node),
                                    lease),
                        {"request_delete_range": {"key": b64(keys.death(node.uuid))}}])


def death_request(keys: Keys, node_uuid: str, mark: bytes) -> dict:
    """The leader's transaction marking node ``node_uuid`` dead with ``mark`` (its
    ``encode_death``): only while the report is still absent (a claim since makes it do
    nothing). The leader adds its fence (``EtcdLeadership.write_fenced``)."""
    return txn(compares=[{"key": b64(keys.report(node_uuid)), "target": "CREATE",
                          "result": "EQUAL", "create_revision": "0"}],
               success=[{"request_put": {"key": b64(keys.death(node_uuid)),
                                         "value": b64(mark)}}])


def forget_request(keys: Keys, node_uuid: str) -> dict:
    """The transaction deleting the leader's mark of node ``node_uuid``'s death, once a
    replica forgot the node (nothing if a claim deleted it already)."""
    return txn(success=[{"request_delete_range": {"key": b64(keys.death(node_uuid))}}])


def publish_request(keys: Keys, replica: str, node: NodeState, lease: int) -> dict:
    """The transaction putting ``node``'s report if its key is still bound to ``lease``;
    else it reads the key (``claimed_elsewhere`` tells whether another lease has it)."""
    key = keys.report(node.uuid)
    return txn(compares=[_same_lease(key, lease)],
               success=[_leased_put(key, encode_report(replica, node), lease)],
               failure=[get(key)])


def withdraw_request(keys: Keys, node_uuid: str, lease: int) -> dict:
    """The transaction deleting a node's report if it is still bound to ``lease``; else
    it reads the report and the mark of the node's death (``withdraw_outcome``)."""
    key = keys.report(node_uuid)
    return txn(compares=[_same_lease(key, lease)],
               success=[{"request_delete_range": {"key": b64(key)}}],
               failure=[get(key), get(keys.death(node_uuid))])


def withdraw_outcome(answer: dict) -> str:
    """What the answer to a ``withdraw_request`` means: ``VANISHED`` (the report is gone:
    the node waits for the leader's mark), ``REMOTE`` (another replica claimed it since:
    its put comes in the watch) or ``DEAD`` (the report was gone already, this replica's
    lease with it, and the leader has marked the node dead)."""
    if answer.get("succeeded"):
        return VANISHED
    found = [bool(r.get("response_range", {}).get("kvs"))
             for r in answer.get("responses") or []] + [False, False]
    return REMOTE if found[0] else DEAD if found[1] else VANISHED


def claimed_elsewhere(answer: dict) -> bool:
    """Whether a refused ``publish_request`` found the key bound to another lease (not:
    the key is gone, so the publisher should claim it again)."""
    responses = answer.get("responses") or [{}]
    return bool(responses[0].get("response_range", {}).get("kvs"))


def reports_range(keys: Keys) -> dict:
    """The range request reading every report and death mark."""
    return range_request(keys.state, prefix_end(keys.state))


# -- replicas and the control status ----------------------------------------------------

@attr.s(frozen=True, auto_attribs=True)
class ReplicaInfo:
    """A replica as it announces itself: its name, the address of its REST API, and when
    it started (seconds since the epoch)."""

    name: str
    address: str
    since: float

    def to_json(self) -> dict:
        """The JSON object of the announcement (and of ``GET /v1/state/control``)."""
        return {"name": self.name, "address": self.address, "since": self.since}


def replica_request(keys: Keys, replica: ReplicaInfo, lease: int) -> dict:
    """The transaction announcing ``replica``, bound to ``lease``."""
    return txn(success=[_leased_put(keys.replica(replica.name),
                                    _canonical(replica.to_json()), lease)])


def decode_replica(value: bytes) -> Optional[ReplicaInfo]:
    """The replica an announcement holds (None if it cannot be read)."""
    try:
        obj = as_object(json.loads(value), "replica")
        return ReplicaInfo(read(obj, "name", (str,), "replica"),
                           read(obj, "address", (str,), "replica"),
                           read_number(obj, "since", "replica"))
    except ValueError:
        return None


def leader_name(kvs: Iterable[dict]) -> Optional[str]:
    """The replica leading, from the election prefix's keys: the one with the lowest
    create revision; its value is the replica's name (as JSON ``{"name"}`` or text)."""
    candidates = sorted(kvs, key=lambda kv: int(kv.get("create_revision", 0)))
    if not candidates:
        return None
    value = unb64(candidates[0].get("value"))
    try:
        obj = json.loads(value)
        if isinstance(obj, dict):
            return str(obj.get("name") or obj.get("replica") or "") or None
    except ValueError:
        pass
    return value.decode("utf-8", "replace") or None


def status_request(keys: Keys) -> dict:
    """The read-only transaction reading the replicas and the election at one revision."""
    return txn(success=[get(keys.replicas, prefix_end(keys.replicas)),
                        get(keys.election, prefix_end(keys.election))])


def member_json(member: dict) -> dict:
    """One etcd member of a member list answer, as ``GET /v1/state/control`` shows it."""
    return {"id": str(member.get("ID", "")), "name": str(member.get("name", "")),
            "client_urls": [str(u) for u in member.get("clientURLs", [])],
            "peer_urls": [str(u) for u in member.get("peerURLs", [])]}


def control_status(me: str, store: str, replicas: Iterable[ReplicaInfo],
                   leader: Optional[str], members: Optional[list[dict]],
                   members_error: Optional[str] = None) -> dict:
    """The body of ``GET /v1/state/control``: ``me`` answers it on store ``store``."""
    body = {"store": store, "replica": me, "leader": leader,
            "replicas": [dict(r.to_json(), leader=r.name == leader)
                         for r in sorted(replicas, key=lambda r: r.name)],
            "etcd_members": members or []}
    if members_error is not None:
        body["etcd_error"] = members_error
    return body


__all__ = [
    "DEAD", "DEFAULT_STATE_LEASE_TTL", "IGNORE", "LOST", "REMOTE", "ReplicaInfo",
    "ReportEvent", "VANISHED", "WatchLine", "claim_request", "claimed_elsewhere",
    "control_status", "death_request", "decode_replica", "decode_report", "encode_death",
    "encode_report", "forget_request", "judge", "leader_name", "member_json",
    "publish_request", "range_events", "read_watch_line", "replica_request",
    "reports_range", "resync_events", "status_request", "watch_request",
    "withdraw_outcome", "withdraw_request",
]
