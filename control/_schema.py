"""
JSON schemas of the REST API's bodies: request validation and the OpenAPI document both
read them, so the documentation cannot drift from what the service accepts.
"""

from __future__ import annotations

import fastjsonschema
from jsonschema import Draft202012Validator

from pyflock.control._tokens import DEFAULT_TTL, DEFAULT_USES, MAXIMUM_TTL, MAXIMUM_USES
from pyflock.common._limits import (
    DATASET_STATES, MAXIMUM_BYTES, MAXIMUM_LEASE, MAXIMUM_METADATA_BYTES,
    MAXIMUM_METADATA_ENTRIES, MAXIMUM_METADATA_TEXT, MAXIMUM_METADATA_TEXT_BYTES,
    MINIMUM_SIZE, SIZE_MULTIPLE,
)

UUID_PATTERN = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

UUID = {"type": "string", "pattern": UUID_PATTERN,
        "description": "A UUID, e.g. 0b41c2b0-5fd6-4e2c-9a8f-42a5b0f3c1d2."}

MAXIMUM_SIZE = {
    "type": ["integer", "null"], "minimum": MINIMUM_SIZE, "maximum": MAXIMUM_BYTES,
    "multipleOf": SIZE_MULTIPLE,
    "description": "Upper limit of the dataset's size in bytes (at least 64 MiB, a "
                   "multiple of 1024), or null for the backend's default.",
}

METADATA = {
    "type": "object", "maxProperties": MAXIMUM_METADATA_ENTRIES,
    "propertyNames": {"minLength": 1, "maxLength": MAXIMUM_METADATA_TEXT},
    "additionalProperties": {"type": "string", "maxLength": MAXIMUM_METADATA_TEXT},
    "description": f"Up to {MAXIMUM_METADATA_ENTRIES} string pairs, keys and values at "
                   f"most {MAXIMUM_METADATA_TEXT} characters ({MAXIMUM_METADATA_TEXT_BYTES} "
                   f"bytes in UTF-8), {MAXIMUM_METADATA_BYTES} bytes in all. `name` is the "
                   "dataset's "
                   "unique name (its Docker volume name).",
}

LEASE_EXPIRES = {"type": ["number", "null"], "minimum": 0, "maximum": MAXIMUM_LEASE,
                 "description": "Seconds until the lease expires; null: never."}

DATASET = {
    "type": "object",
    "required": ["dataset_id", "primary", "maximum_size", "metadata", "deleted"],
    "properties": {
        "dataset_id": UUID, "primary": UUID, "maximum_size": MAXIMUM_SIZE,
        "metadata": METADATA, "deleted": {"type": "boolean"},
        "retained_until": {
            "type": "number",
            "description": "pyflock addition, deleted datasets only: until when (seconds "
                           "since the epoch) the dataset's data is kept and it can be "
                           "restored. Absent once its data goes."},
    },
    "additionalProperties": False,
}

RESTORE_DATASET = {
    "type": "object",
    "properties": {"metadata": {
        "type": "object", "properties": {"name": {
            "type": "string", "minLength": 1, "maxLength": MAXIMUM_METADATA_TEXT}},
        "additionalProperties": False,
        "description": "Only `name`: the name to restore the dataset under, when its "
                       "old one has been taken meanwhile."}},
    "additionalProperties": False,
}

CREATE_DATASET = {
    "type": "object", "required": ["primary"],
    "properties": {
        "primary": UUID, "dataset_id": UUID, "maximum_size": MAXIMUM_SIZE,
        "metadata": METADATA,
        "lease": {
            "type": "object", "required": ["expires"],
            "properties": {"expires": LEASE_EXPIRES},
            "additionalProperties": False,
            "description": "pyflock addition: the primary node's lease on the new dataset, "
                           "taken in the same durable write (the Docker plugin's Create, "
                           "whose Mount follows at once)."},
    },
    "additionalProperties": False,
}

UPDATE_DATASET = {
    "type": "object", "minProperties": 1,
    "properties": {"primary": UUID, "metadata": METADATA},
    "additionalProperties": False,
}

DATASET_STATE = {
    "type": "object", "required": ["dataset_id", "primary", "maximum_size"],
    "properties": {
        "dataset_id": UUID, "primary": UUID, "maximum_size": MAXIMUM_SIZE,
        "path": {"type": "string", "description": "Where the dataset is mounted."},
        "state": {"enum": list(DATASET_STATES),
                  "description": "What the node is doing with the dataset."},
        "transfer": {
            "type": "object", "required": ["bytes_done", "bytes_total"],
            "description": "Only while a peer-to-peer backend (btrfs) moves the dataset "
                           "from this node to its new primary: the bytes sent so far and "
                           "the estimated total (null: no estimate yet). The total grows "
                           "while the dataset is still written during the move.",
            "properties": {
                "bytes_done": {"type": "integer", "minimum": 0},
                "bytes_total": {"type": ["integer", "null"], "minimum": 0},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}

NODE = {
    "type": "object", "required": ["uuid", "host"],
    "properties": {
        "uuid": UUID, "host": {"type": "string"},
        "alive": {"type": "boolean", "description": "Heard from within the node expiry."},
        "last_seen": {"type": "number", "description": "Seconds since it was last heard."},
        "zone": {"type": ["string", "null"],
                 "description": "Its availability zone, as its agent reported it; null: "
                                "not known (not heard since the control service started, "
                                "or a node outside any cloud zone)."},
    },
    "additionalProperties": False,
}

NODE_BY_ERA = {"type": "object", "required": ["uuid"],
               "properties": {"uuid": UUID}, "additionalProperties": False}

_TEXT = {"type": "string"}

#: Issue 9: ``GET /v1/state/control``.
CONTROL_STATUS = {
    "type": "object", "required": ["store", "replica", "leader", "replicas", "etcd_members"],
    "properties": {
        "store": {"type": "string", "enum": ["sqlite", "etcd"],
                  "description": "Where the configuration is kept."},
        "replica": {**_TEXT, "description": "The name of the replica that answered."},
        "leader": {"type": ["string", "null"],
                   "description": "The name of the replica that leads (timed work); null "
                                  "while none does."},
        "replicas": {"type": "array", "items": {
            "type": "object", "required": ["name", "address", "since", "leader"],
            "properties": {
                "name": _TEXT,
                "address": {**_TEXT, "description": "HOST:PORT of its REST API."},
                "since": {"type": "number", "description": "When it started (seconds "
                                                           "since the epoch)."},
                "leader": {"type": "boolean"}},
            "additionalProperties": False}},
        "etcd_members": {"type": "array", "items": {
            "type": "object", "required": ["id", "name", "client_urls", "peer_urls"],
            "properties": {"id": _TEXT, "name": _TEXT,
                           "client_urls": {"type": "array", "items": _TEXT},
                           "peer_urls": {"type": "array", "items": _TEXT}},
            "additionalProperties": False}},
        "etcd_error": {**_TEXT, "description": "Why the etcd members could not be listed."},
    },
    "additionalProperties": False,
}

LEASE = {
    "type": "object", "required": ["dataset_id", "node_uuid", "expires"],
    "properties": {
        "dataset_id": UUID, "node_uuid": UUID,
        "expires": LEASE_EXPIRES,
    },
    "additionalProperties": False,
}

ACQUIRE_LEASE = {
    "type": "object", "required": ["dataset_id", "node_uuid", "expires"],
    "properties": LEASE["properties"], "additionalProperties": False,
}

VERSION = {"type": "object", "required": ["flocker"],
           "properties": {"flocker": {"type": "string"}, "pyflock": {"type": "string"}},
           "additionalProperties": False}

ERROR = {
    "type": "object", "required": ["description"],
    "properties": {"description": {"type": "string"},
                   "errors": {"type": "array", "items": {"type": "string"}},
                   # A 409 refused because another node holds the dataset's lease names
                   # that node here, for programs (the description is for people).
                   "holder": dict(UUID, description="On a 409 for a lease held by "
                                                    "another node: that node's uuid."),
                   "zones": {"type": "object", "required": ["source", "target"],
                             "additionalProperties": False,
                             "description": "On a 409 for a move between availability "
                                            "zones: the zone of the node holding the "
                                            "dataset and the target node's.",
                             "properties": {"source": {"type": "string"},
                                            "target": {"type": "string"}}}},
    "additionalProperties": False,
}


# -- join tokens (issue 10) ----------------------------------------------------------------

CREATE_TOKEN = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "ttl": {"type": "number", "minimum": 1, "maximum": MAXIMUM_TTL,
                "description": f"Seconds the token is valid (default {DEFAULT_TTL:g}, at "
                               f"most {MAXIMUM_TTL:g}: 30 days)."},
        "uses": {"type": "integer", "minimum": 1, "maximum": MAXIMUM_USES,
                 "description": f"How many hosts may join with it (default "
                                f"{DEFAULT_USES})."}},
}

TOKEN = {
    "type": "object", "additionalProperties": False,
    "required": ["token_id", "created", "expires", "uses", "used", "state"],
    "properties": {
        "token_id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "created": {"type": "number", "description": "Seconds since the epoch."},
        "expires": {"type": "number", "description": "Seconds since the epoch."},
        "uses": {"type": "integer", "description": "Joins the token allows."},
        "used": {"type": "integer", "description": "Joins made with it so far."},
        "state": {"enum": ["usable", "expired", "used-up"]}},
}

NEW_TOKEN = {**TOKEN, "required": TOKEN["required"] + ["token"],
             "properties": {**TOKEN["properties"], "token": {
                 "type": "string", "description": "The token itself, shown only here: "
                                                  "the CA pin, the token id and the secret."}}}


def array_of(schema: dict) -> dict:
    """A schema for a JSON array of ``schema``."""
    return {"type": "array", "items": schema}


class BodyValidator:
    """
    Checks request bodies against one schema: a compiled check on the hot path
    (fastjsonschema), and jsonschema's full list of errors only for a refused body.
    """

    def __init__(self, schema: dict):
        Draft202012Validator.check_schema(schema)
        self._explain = Draft202012Validator(schema)
        # The schemas use nothing newer than draft 7, which fastjsonschema compiles.
        self._check = fastjsonschema.compile(
            {**schema, "$schema": "http://json-schema.org/draft-07/schema#"})

    def is_valid(self, instance) -> bool:
        """Whether ``instance`` satisfies the schema."""
        try:
            self._check(instance)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    def errors(self, instance) -> list[str]:
        """Readable messages for every way ``instance`` violates the schema."""
        return describe_errors(self._explain, instance)


def validator(schema: dict) -> BodyValidator:
    """A validator for ``schema`` (checked once, at import)."""
    return BodyValidator(schema)


def describe_errors(validator: Draft202012Validator, instance) -> list[str]:
    """Readable messages for every way ``instance`` violates the schema, stable order."""
    messages = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path)
        messages.append(f"{where}: {error.message}" if where else error.message)
    return messages
