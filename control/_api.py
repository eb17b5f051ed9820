"""
The REST API v1, wire-compatible with Flocker's: paths, JSON shapes, status codes and
error bodies. Where pyflock is deliberately safer (leases, unique names) docs/api.md says so.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional
from uuid import uuid4

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from pyflock.common._limits import metadata_problem
from pyflock.common._model import (
    ConfigurationError, Dataset, DatasetDeleted, DatasetGone, DatasetIdTaken,
    DatasetNotDeleted, DatasetNotFound, LeaseHeld, LeaseNotFound, NameTaken,
)
from pyflock.common._records import (
    Node, dataset_to_json, lease_to_json, node_to_api_json,
)
from pyflock.control import _schema as schema
from pyflock.control._clusterstate import (
    ClusterStateService, ForgetRefused, NodeUnknown, ZoneMismatch, check_same_zone,
)
from pyflock.control._api_base import APIBase, APIError
from pyflock.common._threads import RunBlocking, run_now
from pyflock.control._lists import DatasetList, ListCache, answer, state_list
from pyflock.control._etcd_state_model import ReplicaInfo, control_status
from pyflock.control._persistence import ConfigurationService, TagMismatch
from pyflock.control._ratelimit import NodeLimits, WriteRateLimiter
from pyflock.control._store import StoreError
from pyflock.control._tokens import (
    DEFAULT_TTL, DEFAULT_USES, TokenService, TokenUnknown,
)
from pyflock.common._tokens import valid_token_id

__version__ = "0.1.0"

_log = Logger()

_CREATE = schema.validator(schema.CREATE_DATASET)
_UPDATE = schema.validator(schema.UPDATE_DATASET)
_ACQUIRE = schema.validator(schema.ACQUIRE_LEASE)
_UUID = schema.validator(schema.UUID)
_CREATE_TOKEN = schema.validator(schema.CREATE_TOKEN)
_RESTORE = schema.validator(schema.RESTORE_DATASET)


def _check_metadata(body: dict) -> None:
    """400 if the body's metadata is over the UTF-8 byte limits (issue 8, docs/api.md)."""
    problem = metadata_problem(body.get("metadata") or {})
    if problem is not None:
        raise APIError(400, "The provided JSON doesn't match the required schema.",
                       [f"metadata: {problem}"])


def _tag_mismatch() -> APIError:
    """The 412 of a change made on a configuration that has changed since."""
    return APIError(412, "The configuration tag does not match the current "
                         "configuration: it changed since you read it. Read it again "
                         "and retry.")


def _translate(error: ConfigurationError) -> APIError:
    """The declared response for a refusal of the model."""
    if isinstance(error, DatasetNotFound):
        return APIError(404, "Dataset not found.")
    if isinstance(error, DatasetGone):
        return APIError(410, "The dataset's data is no longer kept (its retention is over "
                             "or it was purged): it cannot be restored.")
    if isinstance(error, DatasetNotDeleted):
        return APIError(409, "The dataset is not deleted: rename it by changing its "
                             "metadata instead.")
    if isinstance(error, DatasetDeleted):
        return APIError(405, "The dataset has been deleted.")
    if isinstance(error, DatasetIdTaken):
        return APIError(409, "The provided dataset_id is already in use.")
    if isinstance(error, NameTaken):
        return APIError(409, f"The name {error.name!r} is already used by dataset "
                             f"{error.dataset_id}; choose another name or delete that "
                             f"dataset first.")
    if isinstance(error, LeaseHeld):
        return APIError(409, f"Lease already held by node {error.node_uuid}: the dataset "
                             f"is in use there; release the lease (or wait for it to "
                             f"expire) first.", holder=error.node_uuid)
    if isinstance(error, LeaseNotFound):
        return APIError(404, "Lease not found.")
    raise error


def _purge_arg(request) -> bool:
    """The ``purge`` query argument of a DELETE: ``true`` or ``false`` (default)."""
    values = request.args.get(b"purge", [b"false"])
    if len(values) != 1 or values[0] not in (b"true", b"false"):
        raise APIError(400, "purge must be given once, as true or false.")
    return values[0] == b"true"


async def _single_replica() -> dict:
    """``GET /v1/state/control`` of a control service told nothing of its replicas."""
    me = ReplicaInfo("control", "", 0.0)
    return control_status(me.name, "sqlite", [me], me.name, [])


class ControlAPI(APIBase):
    """
    The Klein application of the REST API. ``identify(request)`` tells who is calling
    (from the TLS client certificate in production); user certificates may do
    everything, node certificates read everything and act only for their own node.
    """

    app = APIBase.app

    def __init__(self, configuration: ConfigurationService, cluster: ClusterStateService,
                 identify: Callable[[IRequest], object], openapi: Optional[dict] = None,
                 tokens: Optional[TokenService] = None,
                 node_limits: NodeLimits = NodeLimits(),
                 write_limiter: Optional[WriteRateLimiter] = None,
                 run_off_reactor: RunBlocking = run_now,
                 status: Optional[Callable[[], Awaitable[dict]]] = None):
        super().__init__(identify, node_limits, write_limiter)
        self._status = status or _single_replica
        self._configuration = configuration
        self._tokens = tokens
        self._cluster = cluster
        self._openapi = openapi
        # The large lists are built (and gzipped) by ``run_off_reactor``: in the service,
        # a thread, so that writes and the agent channel go on meanwhile.
        self._run = run_off_reactor
        self._datasets = DatasetList(configuration)
        self._configuration_list = ListCache(self._datasets.build, run_off_reactor)
        self._state_list = ListCache(state_list, run_off_reactor)

    def _dataset_id(self, dataset_id: str) -> str:
        if not _UUID.is_valid(dataset_id):
            raise APIError(400, f"{dataset_id!r} is not a dataset id: a dataset id is a UUID.")
        return dataset_id.lower()

    def _check_tag(self, request) -> None:
        expected = request.getHeader(b"x-if-configuration-matches")
        if expected is not None and not self._configuration.tag_may_match(
                expected.decode("latin-1")):
            raise _tag_mismatch()

    async def _change(self, request, dataset_id: str, transform):
        expected = request.getHeader(b"x-if-configuration-matches")
        try:
            # Checked again inside the change: on etcd it may be applied again after
            # another replica's write, against the configuration that write left.
            config = await self._configuration.change(
                [dataset_id], transform,
                expected_tag=None if expected is None else expected.decode("latin-1"))
        except TagMismatch:
            raise _tag_mismatch()
        except ConfigurationError as e:
            raise _translate(e)
        request.setHeader(b"x-configuration-tag", self._configuration.tag.encode("ascii"))
        return config

    # -- routes -----------------------------------------------------------------------

    @app.route("/v1/version", methods=["GET"])
    def version(self, request):
        """The version of the API and of pyflock."""
        self._caller(request)
        return self._json(request, {"flocker": __version__, "pyflock": __version__})

    @app.route("/v1/openapi.json", methods=["GET"])
    def openapi(self, request):
        """The OpenAPI 3.1 document of this API."""
        self._caller(request)
        return self._json(request, self._openapi or {})

    @app.route("/v1/configuration/datasets", methods=["GET"])
    async def list_datasets(self, request):
        """Every live dataset, every deleted one whose data is kept, and deleted ones
        whose data goes that some node still holds."""
        self._caller(request)
        config = self._configuration.committed
        return await answer(request, self._configuration_list, self._run,
                            (config, self._cluster.version),
                            (config, self._cluster.state, self._cluster.version,
                             self._datasets.changes.count), self._configuration.tag)

    @app.route("/v1/configuration/datasets", methods=["POST"])
    async def create_dataset(self, request):
        """Create a dataset on its primary node."""
        identity = self._caller(request)
        self._node_write(identity, self._configuration.now())
        body = self._body(request, _CREATE)
        _check_metadata(body)
        primary = body["primary"].lower()
        self._act_as(identity, primary, "create a dataset on another node")
        lease = body.get("lease")
        if lease is not None:
            self._node_lease(identity, primary, lease["expires"])
        self._node_quota(identity, self._configuration.pending)
        self._check_tag(request)
        size = body.get("maximum_size")
        dataset = Dataset(dataset_id=body.get("dataset_id", str(uuid4())).lower(),
                          primary=primary, maximum_size=None if size is None else int(size),
                          metadata=body.get("metadata", {}))
        now = self._configuration.now()
        leased = (lambda c: c) if lease is None else (lambda c: c.acquire_lease(
            now, dataset.dataset_id, primary, lease["expires"]))
        await self._change(request, dataset.dataset_id, lambda c: leased(c.create(dataset)))
        self._audit(request, "pyflock:control:dataset-created", dataset_id=dataset.dataset_id,
                    primary=primary, name=dataset.name, lease=lease and lease["expires"])
        return self._json(request, dataset_to_json(dataset), 201)

    @app.route("/v1/configuration/datasets/<dataset_id>", methods=["POST"])
    async def update_dataset(self, request, dataset_id):
        """Move a dataset by setting its primary, and/or replace its metadata."""
        identity = self._caller(request)
        self._node_write(identity, self._configuration.now())
        dataset_id = self._dataset_id(dataset_id)
        body = self._body(request, _UPDATE)
        _check_metadata(body)
        primary = body["primary"].lower() if "primary" in body else None
        if identity.kind == "node":
            try:
                current = self._configuration.pending.live(dataset_id)
            except ConfigurationError as e:
                raise _translate(e)
            target = primary or current.primary
            self._act_as(identity, target, "change a dataset that another node holds")
        self._check_tag(request)
        now = self._configuration.now()
        before = self._configuration.pending.datasets.get(dataset_id)

        def update(c):
            changed = c.update(now, dataset_id, primary=primary, metadata=body.get("metadata"))
            check_same_zone(self._cluster.state, dataset_id, c.datasets[dataset_id].primary,
                            changed.datasets[dataset_id].primary)
            return changed
        try:
            config = await self._change(request, dataset_id, update)
        except ZoneMismatch as e:
            raise APIError(409, e.description, zones={"source": e.source_zone,
                                                      "target": e.target_zone})
        dataset = config.datasets[dataset_id]
        if before is not None and before.primary != dataset.primary:
            self._audit(request, "pyflock:control:dataset-moved", dataset_id=dataset_id,
                        source=before.primary, target=dataset.primary)
        elif before != dataset:
            self._audit(request, "pyflock:control:dataset-updated", dataset_id=dataset_id)
        return self._json(request, dataset_to_json(dataset))

    @app.route("/v1/configuration/datasets/<dataset_id>", methods=["DELETE"])
    async def delete_dataset(self, request, dataset_id):
        """Delete a dataset, its data kept for the retention period unless ``purge=true``
        (user certificates only); refused while another node leases it. Idempotent."""
        identity = self._caller(request)
        self._node_write(identity, self._configuration.now())
        dataset_id = self._dataset_id(dataset_id)
        purge = _purge_arg(request)
        if purge:
            identity = self._user_only(request, "purge a dataset")
        allowed_holder = None
        if identity.kind == "node":
            current = self._configuration.pending.datasets.get(dataset_id)
            if current is None:
                raise APIError(404, "Dataset not found.")
            if not current.deleted:
                self._act_as(identity, current.primary, "delete a dataset another node holds")
            allowed_holder = identity.node_uuid
        self._check_tag(request)
        now = self._configuration.now()
        retain_until = self._configuration.retain_until(purge)
        config = await self._change(request, dataset_id, lambda c: c.delete(
            now, dataset_id, allowed_holder=allowed_holder, retain_until=retain_until))
        dataset = config.datasets[dataset_id]
        self._audit(request, "pyflock:control:dataset-deleted", dataset_id=dataset_id,
                    retained_until=dataset.retained_until)
        return self._json(request, dataset_to_json(dataset))

    @app.route("/v1/configuration/datasets/<dataset_id>/restore", methods=["POST"])
    async def restore_dataset(self, request, dataset_id):
        """Bring back a deleted dataset whose data is still kept (user certificates
        only), optionally under a new ``metadata.name``."""
        self._user_only(request, "restore a dataset")
        dataset_id = self._dataset_id(dataset_id)
        empty = request.content is None or not request.content.read(1)
        if not empty:
            request.content.seek(0)
        body = {} if empty else self._body(request, _RESTORE)
        name = body.get("metadata", {}).get("name")
        self._check_tag(request)
        config = await self._change(request, dataset_id,
                                    lambda c: c.restore(dataset_id, name))
        dataset = config.datasets[dataset_id]
        self._audit(request, "pyflock:control:dataset-restored", dataset_id=dataset_id,
                    name=dataset.name)
        return self._json(request, dataset_to_json(dataset))

    @app.route("/v1/state/datasets", methods=["GET"])
    async def state_datasets(self, request):
        """The datasets the live nodes report, with where they are mounted."""
        self._caller(request)
        state = self._cluster.state
        alive = frozenset(n.uuid for n in state.nodes.values() if self._cluster.is_alive(n))
        return await answer(request, self._state_list, self._run,
                            (self._cluster.version, alive), (state, alive))

    @app.route("/v1/state/nodes", methods=["GET"])
    def state_nodes(self, request):
        """Every known node, whether it is alive and when it was last heard from."""
        self._caller(request)
        return self._json(request, [
            self._node_json(n, self._cluster.is_alive(n))
            for n in self._cluster.state.nodes.values()])

    def _node_json(self, node, alive: bool) -> dict:
        return node_to_api_json(Node(
            node.uuid, node.host, alive=alive,
            last_seen=max(0.0, self._configuration.now() - node.last_seen), zone=node.zone))

    @app.route("/v1/state/control", methods=["GET"])
    async def control_state(self, request):
        """Issue 9: the replicas, the one that leads, and the etcd members."""
        self._caller(request)
        try:
            body = await self._status()
        except Exception as e:
            raise APIError(503, f"etcd did not answer ({e}); retry shortly.")
        return self._json(request, body)

    @app.route("/v1/state/nodes/by_era/<era>", methods=["GET"])
    def node_by_era(self, request, era):
        """The node whose current era is ``era``."""
        self._caller(request)
        node = self._cluster.state.node_by_era(era)
        if node is None:
            raise APIError(404, "No node found with given era.")
        return self._json(request, {"uuid": node.uuid})

    @app.route("/v1/configuration/leases", methods=["GET"])
    def list_leases(self, request):
        """Every lease still valid, with the seconds it has left."""
        self._caller(request)
        now = self._configuration.now()
        return self._json(request, [lease_to_json(lease, now) for lease in
                                    self._configuration.committed.leases.values()
                                    if not lease.expired(now)])

    @app.route("/v1/configuration/leases", methods=["POST"])
    async def acquire_lease(self, request):
        """Take (201) or renew (200) a node's lease on a dataset."""
        identity = self._caller(request)
        body = self._body(request, _ACQUIRE)
        dataset_id = body["dataset_id"].lower()
        node_uuid = body["node_uuid"].lower()
        self._node_lease(identity, node_uuid, body["expires"])
        now = self._configuration.now()
        renewed = self._configuration.pending.leases.holder(now, dataset_id) == node_uuid
        try:
            config = await self._change(request, dataset_id, lambda c: c.acquire_lease(
                now, dataset_id, node_uuid, body["expires"]))
        except APIError as e:
            if e.code == 405:
                raise APIError(404, "Dataset not found.")
            raise
        self._audit(request, "pyflock:control:lease-renewed" if renewed
                    else "pyflock:control:lease-acquired",
                    dataset_id=dataset_id, node_uuid=node_uuid)
        return self._json(request, lease_to_json(config.leases[dataset_id], now),
                          200 if renewed else 201)

    @app.route("/v1/configuration/leases/<dataset_id>", methods=["DELETE"])
    async def release_lease(self, request, dataset_id):
        """Release the lease on a dataset (a node only its own)."""
        identity = self._caller(request)
        dataset_id = self._dataset_id(dataset_id)
        now = self._configuration.now()
        lease = self._configuration.pending.leases.get(dataset_id)
        if lease is None or lease.expired(now):
            raise APIError(404, "Lease not found.")
        if identity.kind == "node":
            self._act_as(identity, lease.node_uuid, "release another node's lease")
        await self._change(request, dataset_id, lambda c: c.release_lease(dataset_id))
        self._audit(request, "pyflock:control:lease-released", dataset_id=dataset_id,
                    node_uuid=lease.node_uuid)
        return self._json(request, lease_to_json(lease, now))

    # -- pyflock addition: forgetting a dead node (issue 7) ------------------------------

    @app.route("/v1/state/nodes/<node_uuid>", methods=["DELETE"])
    def forget_node(self, request, node_uuid):
        """Forget a dead node that holds no dataset and no lease (user certificates only)."""
        self._user_only(request, "forget a node")
        if not _UUID.is_valid(node_uuid):
            raise APIError(400, f"{node_uuid!r} is not a node uuid.")
        try:
            node = self._cluster.forget(node_uuid.lower(), self._configuration.pending)
        except NodeUnknown as e:
            raise APIError(404, e.description)
        except ForgetRefused as e:
            raise APIError(409, e.description)
        return self._json(request, self._node_json(node, alive=False))

    # -- pyflock addition: join tokens (issue 10) -----------------------------------------

    def _token_service(self, request) -> TokenService:
        """The token service, for a user certificate only; 409 when joins are off."""
        self._user_only(request, "manage join tokens")
        if self._tokens is None:
            raise APIError(409, "This control service serves no joins: it has no CA key. "
                                "Start it with --ca-key (default: cluster.key in its "
                                "certificates folder).")
        return self._tokens

    @staticmethod
    def _token_stored(error: StoreError) -> APIError:
        """The 503 of a token change the store failed."""
        return APIError(503, f"The configuration store failed to keep the join token "
                             f"({error}); retry.")

    @app.route("/v1/tokens", methods=["GET"])
    def list_tokens(self, request):
        """Every join token, without secrets (user certificates only)."""
        tokens = self._token_service(request)
        now = tokens.now()
        return self._json(request, [r.to_json(now) for r in tokens.book.records()])

    @app.route("/v1/tokens", methods=["POST"])
    async def create_token(self, request):
        """Create a join token; the only answer that ever shows its secret."""
        tokens = self._token_service(request)
        body = self._body(request, _CREATE_TOKEN)
        try:
            token, record = await tokens.create(body.get("ttl", DEFAULT_TTL),
                                                body.get("uses", DEFAULT_USES))
        except StoreError as e:
            raise self._token_stored(e)
        self._audit(request, "pyflock:control:token-created", token_id=record.token_id,
                    expires=record.expires, uses=record.uses)
        return self._json(request, dict(record.to_json(tokens.now()), token=str(token)), 201)

    @app.route("/v1/tokens/<token_id>", methods=["DELETE"])
    async def revoke_token(self, request, token_id):
        """Revoke a join token (user certificates only)."""
        tokens = self._token_service(request)
        if not valid_token_id(token_id):
            raise APIError(400, f"{token_id!r} is not a token id: 16 lower-case hex digits.")
        try:
            record = await tokens.revoke(token_id)
        except TokenUnknown as e:
            raise APIError(404, f"No join token has the id {e.args[0]}.")
        except StoreError as e:
            raise self._token_stored(e)
        self._audit(request, "pyflock:control:token-revoked", token_id=token_id)
        return self._json(request, record.to_json(tokens.now()))
