"""
The values of ``pyflock.common._records`` and their codecs: every JSON form reads back to
the value it was written from, and malformed JSON is refused with a ``Malformed`` naming
the field and the rule broken. The REST API's schema and the codecs take the same limits.
"""

from __future__ import annotations

import json

import attr
import pytest
from hypothesis import given, strategies as st

from pyflock.common._limits import (
    DATASET_STATES, MAXIMUM_BYTES, MAXIMUM_LEASE, MAXIMUM_METADATA_ENTRIES, MAXIMUM_METADATA_TEXT,
    MINIMUM_SIZE,
)
from pyflock.common._records import (
    Dataset, DatasetEntry, DatasetReport, Lease, Malformed, Metadata, Node,
    dataset_entry_from_json, dataset_entry_to_json, dataset_from_json, dataset_to_json,
    lease_from_json, lease_to_json, metadata_of, node_from_api_json, node_from_json,
    node_to_api_json, node_to_json, report_from_api_json, report_from_json, report_to_api_json,
    report_to_json, Transfer,
)
from pyflock.control import _schema as schema

DS = "6b1d2b8e-6e52-4c31-9c59-2e4dbe0c2a4f"
A = "0f6b1f0c-5a43-4e0e-8d0d-4e5b4d9b0a11"
B = "9a3c1c44-8f6b-4d3a-b5a6-1f2e3d4c5b6a"
DATASET_JSON = {"dataset_id": DS, "primary": A, "maximum_size": MINIMUM_SIZE,
                "metadata": {"name": "pg"}, "deleted": False}

uuids = st.uuids().map(str)
sizes = st.none() | st.integers(MINIMUM_SIZE // 1024, MAXIMUM_BYTES // 1024).map(
    lambda k: k * 1024)
metadata = st.dictionaries(st.text(min_size=1, max_size=MAXIMUM_METADATA_TEXT),
                           st.text(max_size=MAXIMUM_METADATA_TEXT),
                           max_size=MAXIMUM_METADATA_ENTRIES)
datasets = st.builds(Dataset, uuids, uuids, sizes, metadata, st.booleans())
times = st.floats(min_value=0, max_value=1e9)


def json_trip(value):
    """``value`` after a trip through JSON text, as it reaches a decoder."""
    return json.loads(json.dumps(value))


def refused(decode, value, *fragments):
    """Assert that ``decode(value)`` raises ``Malformed`` saying every one of ``fragments``."""
    with pytest.raises(Malformed) as caught:
        decode(value)
    for fragment in fragments:
        assert fragment in str(caught.value)


# -- Dataset -------------------------------------------------------------------------------


@given(datasets)
def test_dataset_round_trip(dataset):
    """A dataset's JSON object reads back to the same dataset."""
    assert dataset_from_json(json_trip(dataset_to_json(dataset))) == dataset


def test_dataset_json_shape():
    """The JSON object has exactly the REST API's five fields."""
    assert dataset_to_json(dataset_from_json(DATASET_JSON)) == DATASET_JSON


def test_dataset_optional_fields():
    """Size, metadata and the deleted flag may be left out: null, none, false."""
    assert dataset_from_json({"dataset_id": DS, "primary": A}) == Dataset(DS, A)


@pytest.mark.parametrize("change, fragments", [
    ({"dataset_id": DS.upper()}, ["dataset.dataset_id must be a lower-case UUID"]),
    ({"primary": 7}, ["dataset.primary must be a string, not int"]),
    ({"maximum_size": 1024}, ["dataset.maximum_size must be null or a multiple of 1024",
                              "not 1024"]),
    ({"maximum_size": MINIMUM_SIZE + 1}, ["multiple of 1024"]),
    ({"maximum_size": MAXIMUM_BYTES + 1024}, [str(MAXIMUM_BYTES)]),
    ({"maximum_size": True}, ["dataset.maximum_size must be an integer, not a boolean"]),
    ({"maximum_size": 1.5e9}, ["must be an integer or null, not float"]),
    ({"metadata": {"a": 1}}, ["dataset.metadata values must be strings"]),
    ({"metadata": {"": "x"}}, ["keys not empty"]),
    ({"metadata": {"a": "x" * (MAXIMUM_METADATA_TEXT + 1)}}, ["at most 256 characters"]),
    ({"metadata": {str(i): "" for i in range(MAXIMUM_METADATA_ENTRIES + 1)}},
     ["has 17 pairs; at most 16"]),
    ({"metadata": []}, ["dataset.metadata must be an object"]),
    ({"deleted": "no"}, ["dataset.deleted must be a boolean"]),
])
def test_dataset_refused(change, fragments):
    """Each broken rule is refused with a message naming the field and the rule."""
    refused(dataset_from_json, dict(DATASET_JSON, **change), *fragments)


def test_dataset_missing_and_not_object():
    """A missing required field and a non-object are refused, saying so."""
    refused(dataset_from_json, {"dataset_id": DS}, "dataset lacks 'primary'")
    refused(dataset_from_json, [DATASET_JSON], "dataset must be an object, not list")


@given(metadata)
def test_metadata_of(pairs):
    """``metadata_of`` builds the same map as pyrsistent's own checked conversion."""
    built = metadata_of(pairs)
    assert (type(built), built) == (Metadata, Metadata.create(pairs))
    assert metadata_of(built) is built


def test_metadata_of_refuses():
    """Metadata that does not map strings to strings is a ``TypeError`` naming the pair."""
    with pytest.raises(TypeError, match="'a': 1"):
        metadata_of({"a": 1})


def test_dataset_invariants():
    """The value itself refuses a size the API would refuse, and keeps metadata typed."""
    with pytest.raises(ValueError, match="maximum_size must be null or a multiple"):
        Dataset(DS, A, maximum_size=1024)
    with pytest.raises(TypeError):
        Dataset(DS, A, metadata={"a": 1})
    assert Dataset(DS, A, metadata={"name": "pg"}).name == "pg"


# -- Lease ---------------------------------------------------------------------------------


@given(uuids, uuids, times, st.none() | st.floats(min_value=0, max_value=MAXIMUM_LEASE))
def test_lease_round_trip(dataset_id, node_uuid, now, expires):
    """A live lease written at ``now`` reads back at ``now`` to the same expiration."""
    lease = Lease.lasting(dataset_id, node_uuid, now, expires)
    assert lease_from_json(json_trip(lease_to_json(lease, now)), now) == lease


def test_lease_expires_is_seconds_left():
    """The API's ``expires`` is the seconds left at ``now``; ``expiration`` is absolute."""
    lease = Lease(DS, A, expiration=160.0)
    assert lease_to_json(lease, 100.0) == {"dataset_id": DS, "node_uuid": A, "expires": 60.0}
    assert lease_to_json(lease, 200.0)["expires"] == 0.0
    assert lease_from_json({"dataset_id": DS, "node_uuid": A, "expires": 60}, 100.0) == lease
    assert lease_to_json(Lease(DS, A), 5.0)["expires"] is None


@pytest.mark.parametrize("expires, fragment", [
    (-1, "lease.expires must be a number between 0 and"),
    (MAXIMUM_LEASE + 1, str(MAXIMUM_LEASE)),
    (10 ** 400, "lease.expires must be a number"),
    ("60", "lease.expires must be an integer or a number or null, not str"),
    (False, "not a boolean"),
])
def test_lease_refused(expires, fragment):
    """A lease with an impossible ``expires`` is refused, saying why."""
    refused(lambda v: lease_from_json(v, 0.0),
            {"dataset_id": DS, "node_uuid": A, "expires": expires}, fragment)


def test_lease_expiry():
    """A lease has run out at its expiration, not before; one without never does."""
    lease = Lease(DS, A, 10)
    assert (lease.expired(9.9), lease.expired(10), lease.remaining(4)) == (False, True, 6.0)
    assert not Lease(DS, A).expired(1e12) and Lease(DS, A).remaining(0) is None


# -- DatasetEntry --------------------------------------------------------------------------


entries = st.builds(
    lambda d, holder, expiration, holders: DatasetEntry.of(
        d, None if holder is None else Lease(d.dataset_id, holder, expiration), holders),
    datasets, st.none() | uuids, st.none() | times, st.sets(uuids, max_size=3))


@given(entries)
def test_entry_round_trip(entry):
    """An entry's agent-channel JSON reads back to the same entry, lease and holders."""
    assert dataset_entry_from_json(json_trip(dataset_entry_to_json(entry))) == entry


def test_entry_json_shape():
    """The entry's JSON is the dataset's plus the lease's holder and absolute expiration."""
    entry = DatasetEntry.of(dataset_from_json(DATASET_JSON), Lease(DS, A, 12.5), [B, A])
    assert dataset_entry_to_json(entry) == dict(
        DATASET_JSON, lease={"node_uuid": A, "expiration": 12.5}, holders=sorted([A, B]))


def test_entry_is_a_dataset():
    """An entry extends the dataset it was made of, whose fields it shares."""
    dataset = dataset_from_json(DATASET_JSON)
    entry = DatasetEntry.of(dataset)
    assert isinstance(entry, Dataset) and entry.name == "pg"
    assert dataset_to_json(entry) == dataset_to_json(dataset)


def test_entry_lease_holder():
    """Only a lease still valid at ``now`` has a holder."""
    entry = DatasetEntry(DS, A, lease=Lease(DS, B, 10.0))
    assert (entry.lease_holder(9), entry.lease_holder(10)) == (B, None)
    assert DatasetEntry(DS, A).lease_holder(0) is None


def test_entry_lease_of_another_dataset():
    """An entry refuses a lease on another dataset."""
    with pytest.raises(ValueError, match="is not dataset"):
        DatasetEntry(DS, A, lease=Lease(B, A))


def test_entry_refused():
    """A malformed lease or holders list is refused, saying where."""
    good = dataset_entry_to_json(DatasetEntry(DS, A))
    refused(dataset_entry_from_json, dict(good, lease={"node_uuid": "x"}),
            "dataset.lease.node_uuid must be a lower-case UUID")
    refused(dataset_entry_from_json, dict(good, lease={"node_uuid": A, "expiration": "1"}),
            "dataset.lease.expiration must be an integer or a number or null")
    refused(dataset_entry_from_json, dict(good, holders=[A, A]), "names " + A + " twice")


# -- DatasetReport -------------------------------------------------------------------------


transfers = st.builds(Transfer, st.integers(0, 2 ** 62), st.none() | st.integers(0, 2 ** 62))

reports = st.builds(DatasetReport, uuids, st.sampled_from(DATASET_STATES),
                    st.none() | st.text(min_size=1, max_size=100),
                    st.none() | st.integers(0, 2 ** 62),
                    transfer=st.none() | transfers)


@given(reports)
def test_report_round_trip(report):
    """A report's agent-channel JSON reads back to the same report."""
    assert report_from_json(json_trip(report_to_json(report))) == report


@given(reports, uuids)
def test_report_api_round_trip(report, node):
    """A node's report reads back from the REST API's JSON, mount path only once mounted."""
    report = attr.evolve(report, node_uuid=node)
    expected = report if report.state == "mounted" else attr.evolve(report, path=None)
    assert report_from_api_json(json_trip(report_to_api_json(report))) == expected


def test_report_api_shape():
    """The API's object names the reporting node ``primary``."""
    report = DatasetReport(DS, "mounted", "/m/x", MINIMUM_SIZE, node_uuid=A)
    assert report_to_api_json(report) == {"dataset_id": DS, "primary": A, "state": "mounted",
                                          "maximum_size": MINIMUM_SIZE, "path": "/m/x"}


def test_report_transfer_shape_and_checks():
    """A move's progress is an object of two counts, given only while there is one;
    negative or missing counts are refused saying where."""
    report = DatasetReport(DS, "moving", transfer=Transfer(5, None), node_uuid=A)
    assert report_to_api_json(report)["transfer"] == {"bytes_done": 5, "bytes_total": None}
    assert "transfer" not in report_to_json(attr.evolve(report, transfer=None))
    base = {"dataset_id": DS, "state": "moving", "path": None, "maximum_size": None}
    refused(report_from_json, {**base, "transfer": {"bytes_done": -1}},
            "report.transfer.bytes_done must be between")
    refused(report_from_json, {**base, "transfer": {}}, "report.transfer lacks 'bytes_done'")
    refused(report_from_json, {**base, "transfer": 3}, "report.transfer must be")


def test_report_states():
    """The agent channel takes only the known states; the API client takes any state
    (a newer service may have more) and none (Flocker reports none)."""
    refused(report_from_json, {"dataset_id": DS, "state": "exploded", "path": None,
                               "maximum_size": None}, "report.state must be one of")
    assert report_from_api_json({"dataset_id": DS, "primary": A, "state": "resizing"}
                                ).state == "resizing"
    assert report_from_api_json({"dataset_id": DS, "primary": A, "maximum_size": None}
                                ) == DatasetReport(DS, node_uuid=A)


# -- Node ----------------------------------------------------------------------------------


hosts = st.text(min_size=1, max_size=50)


@given(uuids, hosts, st.none() | st.integers(1, 65535), st.booleans())
def test_node_round_trip(uuid, host, port, alive):
    """A node's agent-channel JSON reads back to the same node, peer port included."""
    node = Node(uuid, host, port, alive)
    assert node_from_json(json_trip(node_to_json(node))) == node


@given(uuids, hosts, st.none() | st.booleans(),
       st.none() | st.floats(0, 1e9) | st.text(max_size=20), st.none() | hosts)
def test_node_api_round_trip(uuid, host, alive, last_seen, zone):
    """A node's REST API JSON reads back to the same node (no peer port there)."""
    node = Node(uuid, host, alive=alive, last_seen=last_seen, zone=zone)
    assert node_from_api_json(json_trip(node_to_api_json(node))) == node


def test_node_json_shapes():
    """The agent channel gives where peers reach the node; the API, liveness, when it
    was last heard and its zone (Flocker's nodes give none: unknown)."""
    node = Node(A, "10.0.0.1", 4525, False, 2.5, "eu-west-1a")
    assert node_to_json(node) == {"uuid": A, "host": "10.0.0.1", "peer_port": 4525,
                                  "alive": False}
    assert node_to_api_json(node) == {"uuid": A, "host": "10.0.0.1", "alive": False,
                                      "last_seen": 2.5, "zone": "eu-west-1a"}
    assert node_from_api_json({"uuid": A, "host": "h"}) == Node(A, "h", alive=None)


def test_node_refused():
    """A malformed node is refused, saying which field and why."""
    good = node_to_json(Node(A, "h", 4525))
    refused(node_from_json, dict(good, peer_port=0), "node.peer_port must be between 1")
    refused(node_from_json, dict(good, uuid="x"), "node.uuid must be a lower-case UUID")
    refused(node_from_json, {"uuid": A, "host": "h", "peer_port": None}, "node lacks 'alive'")
    refused(node_from_api_json, {"uuid": A}, "node lacks 'host'")
    with pytest.raises(TypeError):
        Node(A, "h", alive="yes")


# -- one set of limits ---------------------------------------------------------------------


_DATASET_SCHEMA = schema.validator(schema.DATASET)


#: Texts on both sides of each length limit, and any text.
_texts = st.sampled_from([0, 1, MAXIMUM_METADATA_TEXT, MAXIMUM_METADATA_TEXT + 1]).map(
    lambda n: "k" * n) | st.text(max_size=8)
_sizes = st.sampled_from([None, 0, MINIMUM_SIZE - 1024, MINIMUM_SIZE, MINIMUM_SIZE + 1,
                          MAXIMUM_BYTES, MAXIMUM_BYTES + 1024, 2 ** 64])


@given(_sizes, st.dictionaries(_texts, _texts, max_size=MAXIMUM_METADATA_ENTRIES + 1))
def test_schema_and_codec_agree(size, pairs):
    """The REST API's schema and the codec accept exactly the same sizes and metadata."""
    value = dict(DATASET_JSON, maximum_size=size, metadata=pairs)
    try:
        dataset_from_json(value)
        accepted = True
    except Malformed:
        accepted = False
    assert _DATASET_SCHEMA.is_valid(value) == accepted
