"""
A client for the control service's REST API v1, over any treq-like HTTP object.

``ControlClient(http, base_url)`` speaks the API of docs/api.md; ``http`` is a
``treq.client.HTTPClient`` (``pyflock.common._tls.treq_client`` makes one with the
cluster's certificates) or, in tests, a ``treq.testing.StubTreq``. Every method returns a
Deferred of a frozen value: the ``Dataset``, ``Lease``, ``DatasetReport`` and ``Node`` of
``pyflock.common._records`` (read with their codecs), or ``VersionInfo``,
``DatasetListing``. A lease's ``expiration`` is measured on the client's clock (its
``reactor``): the API's ``expires``, seconds left, counted from when the answer came.
Refusals arrive as ``ControlError`` subclasses chosen by status code; a control service
that cannot be reached, or that fails the TLS handshake, as ``ControlUnreachable`` naming
the host and port it tried.

Given several replicas' URLs (issue 9), a call that finds its replica unreachable, or
answered 503, goes to the next one at once, the client staying with the replica that
answered; one full round of failures ends the call. A call is repeated on another replica
only if it cannot have been carried out (its connection or TLS handshake failed) or if
repeating it is harmless (GET; moves, metadata updates and lease renewals without
``if_matches``); any other call whose answer was lost fails with ``AnswerLost``, saying it
may have been carried out and how to check.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence, Union
from urllib.parse import quote

import attr
import hyperlink
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.web.client import RequestNotSent, RequestTransmissionFailed, ResponseFailed
from zope.interface import Interface, implementer

from pyflock.common._jsonread import Malformed, as_object, read, read_list
from pyflock.common._replicas import ReplicaOrder
from pyflock.common._tokens import TokenInfo
from pyflock.common._records import (
    Dataset, DatasetReport, Lease, Node, dataset_from_json, lease_from_json,
    node_from_api_json, report_from_api_json,
)

#: The API's version prefix; ``base_url`` is the service root without it.
API_PREFIX = "/v1"


class ControlError(Exception):
    """
    The control service refused or failed a request: ``code`` is the HTTP status (None when
    no answer arrived), ``description`` its explanation, ``errors`` the schema failures.
    """

    def __init__(self, code: Optional[int], description: str, errors: Sequence[str] = ()):
        super().__init__(code, description, tuple(errors))
        self.code = code
        self.description = description
        self.errors = tuple(errors)

    def __str__(self) -> str:
        if self.errors:
            return f"{self.description} ({'; '.join(self.errors)})"
        return self.description

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.args == other.args  # type: ignore

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class InvalidRequest(ControlError):
    """400: the request's body or parameters were malformed; ``errors`` says where."""


class AccessDenied(ControlError):
    """403: this certificate may not do that (a node acting for another node)."""


class NotFound(ControlError):
    """404: no such dataset, lease, node era or route."""


class NotAllowed(ControlError):
    """405: the dataset has been deleted (or the method does not apply to the route)."""


class Conflict(ControlError):
    """
    409: the dataset id or name is taken, or another node holds the dataset's lease;
    ``holder`` is then that node's uuid (the answer's ``holder`` field), else None; or a
    move crosses availability zones: ``zones`` is then ``(source, target)``, else None.
    """

    def __init__(self, code: Optional[int], description: str, errors: Sequence[str] = (),
                 holder: Optional[str] = None, zones: Optional[tuple[str, str]] = None):
        super().__init__(code, description, errors)
        self.holder = holder
        self.zones = zones


class Gone(ControlError):
    """410: the deleted dataset's data is no longer kept; it cannot be restored."""


class ConfigurationChanged(ControlError):
    """412: the configuration changed since the tag given as ``if_matches``."""


class UnexpectedResponse(ControlError):
    """The answer was not what API v1 promises (not JSON, or missing fields)."""


class ControlUnreachable(ControlError):
    """No answer arrived from ``host``:``port``: refused, unresolvable, TLS failure, timeout."""

    def __init__(self, host: str, port: int, reason: str):
        super().__init__(None, f"cannot reach the control service at {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


class NoReplicaAnswered(ControlUnreachable):
    """Every control service replica given failed; ``failures`` says why, per replica."""

    def __init__(self, failures: Sequence[ControlUnreachable]):
        last = failures[-1]
        super().__init__(last.host, last.port, last.reason)
        self.failures = tuple(failures)
        self.description = ("cannot reach any control service replica: "
                            + "; ".join(f"{f.host}:{f.port}: {f.reason}" for f in failures))
        self.args = (None, self.description, ())


class AnswerLost(ControlUnreachable):
    """A change was sent but its answer never came: it may have been carried out."""

    def __init__(self, host: str, port: int, reason: str, method: str, path: str):
        super().__init__(host, port, reason)
        self.description = (
            f"{method} {API_PREFIX}{path} was sent to the control service at {host}:{port} "
            f"but no answer came ({reason}); it may have been carried out: read the "
            f"configuration (pyflock list, or GET {API_PREFIX}/configuration/datasets and "
            f"{API_PREFIX}/configuration/leases) before trying again")
        self.args = (None, self.description, ())


_ERRORS_BY_CODE: dict[int, type[ControlError]] = {
    400: InvalidRequest,
    403: AccessDenied,
    404: NotFound,
    405: NotAllowed,
    409: Conflict,
    410: Gone,
    412: ConfigurationChanged,
}


_MISSING = object()

@attr.s(frozen=True, auto_attribs=True)
class VersionInfo:
    """What ``GET /v1/version`` answers; ``pyflock`` is None from a Flocker server."""

    flocker: str
    pyflock: Optional[str] = None

    @classmethod
    def from_json(cls, obj: Any) -> "VersionInfo":
        """The record of one API JSON object."""
        obj = as_object(obj, "version")
        return cls(flocker=read(obj, "flocker", (str,), "version"),
                   pyflock=read(obj, "pyflock", (str,), "version", True, None))

    def to_json(self) -> dict:
        """The API JSON object of this record."""
        return {"flocker": self.flocker, "pyflock": self.pyflock}


@attr.s(frozen=True, auto_attribs=True)
class DatasetListing:
    """The configured datasets (deleted ones included) and the configuration tag."""

    datasets: tuple[Dataset, ...]
    tag: Optional[str]


class IControlClient(Interface):
    """The REST API v1 as Deferred-returning calls (see ``ControlClient``)."""

    def version() -> "Deferred[VersionInfo]":
        """The service's API and software versions."""

    def seconds() -> float:
        """The client's clock: the leases it returns expire at times measured on it."""

    def list_datasets() -> "Deferred[DatasetListing]":
        """Every configured dataset, deleted ones included, and the configuration tag."""

    def create_dataset(primary, maximum_size=None, metadata=None, dataset_id=None,
                       if_matches=None, lease=None) -> "Deferred[Dataset]":
        """Configure a new dataset on node ``primary``; with ``lease`` (seconds), that
        node's lease on it is taken in the same write."""

    def move_dataset(dataset_id, primary, if_matches=None) -> "Deferred[Dataset]":
        """Make ``primary`` the dataset's node."""

    def update_metadata(dataset_id, metadata,
                        if_matches=None) -> "Deferred[Dataset]":
        """Replace the dataset's metadata."""

    def delete_dataset(dataset_id, if_matches=None, purge=False) -> "Deferred[Dataset]":
        """Mark the dataset deleted (its data kept for a while unless ``purge``)."""

    def restore_dataset(dataset_id, name=None, if_matches=None) -> "Deferred[Dataset]":
        """Bring back a deleted dataset whose data is kept (under ``name`` if given)."""

    def state_datasets() -> "Deferred[tuple[DatasetReport, ...]]":
        """The datasets as the nodes report them."""

    def list_nodes() -> "Deferred[tuple[Node, ...]]":
        """The nodes the control service knows."""

    def node_by_era(era) -> "Deferred[str]":
        """The uuid of the node whose agent runs in ``era``."""

    def list_leases() -> "Deferred[tuple[Lease, ...]]":
        """Every lease."""

    def acquire_lease(dataset_id, node_uuid, expires) -> "Deferred[Lease]":
        """Take or renew ``node_uuid``'s lease for ``expires`` seconds (None: forever)."""

    def release_lease(dataset_id) -> "Deferred[Lease]":
        """Drop the dataset's lease."""

    def create_token(ttl=None, uses=None) -> "Deferred[TokenInfo]":
        """A new join token (``token`` holds the whole token); user certificates only."""

    def list_tokens() -> "Deferred[tuple[TokenInfo, ...]]":
        """Every join token, without secrets."""

    def revoke_token(token_id) -> "Deferred[TokenInfo]":
        """Revoke join token ``token_id`` (``NotFound`` if there is none)."""

    def forget_node(node_uuid) -> "Deferred[Node]":
        """Forget a dead node that holds no dataset and no lease (pyflock addition)."""


_NO_ANSWER = "no answer in time"


def _tls_reason(error: SSL.Error) -> str:
    # OpenSSL reports [(library, function, reason), ...]; the reasons alone read best.
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(e[-1]) for e in entries if isinstance(e, tuple) and e]
    text = "; ".join(reasons) or str(error)
    if "certificate verify failed" in text:
        return (f"TLS handshake failed: {text} (the control service's certificate is not "
                "signed by the cluster.crt in the certificates folder: is that folder "
                "for this cluster?)")
    if "alert" in text:
        return (f"TLS handshake failed: the control service refused this client's "
                f"certificate ({text}): is it signed by the control service's cluster CA?")
    return f"TLS handshake failed: {text}"


def _describe(error: BaseException, host: str) -> str:
    """One readable line saying why no answer arrived from ``host``."""
    if isinstance(error, ResponseFailed):
        reasons = [f.value for f in error.reasons]
        # ConnectionLost/ConnectionDone merely follow the error that caused them.
        interesting = [r for r in reasons
                       if type(r).__name__ not in ("ConnectionLost", "ConnectionDone")]
        for reason in interesting or reasons:
            return _describe(reason, host)
        return "the connection closed before an answer arrived"
    if isinstance(error, SSL.Error):
        return _tls_reason(error)
    if type(error).__name__ == "VerificationError":
        if not hasattr(error, "errors"):
            return f"TLS handshake failed: {error}"
        # service_identity's error when the certificate is not for the host we dialled.
        return (f"TLS handshake failed: the control service's certificate is not issued "
                f"for {host!r}; connect with the host name or address it was issued for "
                "(pyflock-ca create-control-certificate HOST)")
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return _NO_ANSWER
    if isinstance(error, DNSLookupError):
        return "the host name cannot be resolved"
    if type(error).__name__ == "ConnectionRefusedError":
        return "connection refused (is pyflock-control running and listening there?)"
    if type(error).__name__ in ("ConnectionLost", "ConnectionDone"):
        return "the connection closed before an answer arrived"
    text = str(error).strip()
    return text or type(error).__name__

#: One readable line saying why no answer arrived from a host (``join`` uses it too).
describe_failure = _describe

_UNREACHABLE = (ConnectError, DNSLookupError, ResponseFailed, CancelledError,
                ConnectingCancelledError, SSL.Error, ConnectionError, RequestNotSent,
                RequestTransmissionFailed)


def never_sent(error: BaseException) -> bool:
    """Whether a request that failed with ``error`` cannot have reached the control
    service's API: no connection, a failed TLS handshake, or a request cut short."""
    if isinstance(error, (ConnectError, DNSLookupError, ConnectingCancelledError, SSL.Error,
                          RequestNotSent, RequestTransmissionFailed)):
        return True
    if isinstance(error, ResponseFailed):
        return any(isinstance(f.value, SSL.Error)
                   or type(f.value).__name__ == "VerificationError" for f in error.reasons)
    return False


@implementer(IControlClient)
class ControlClient:
    """
    The REST API v1 at ``base_url`` (``https://HOST:PORT``, no ``/v1``), or at any of
    several replicas' URLs (a sequence), through ``http``, a treq-like object. With
    ``timeout`` (seconds, each attempt; required with several replicas) and ``reactor``, a
    request that gets no answer in time fails with ``ControlUnreachable``. ``reactor`` is
    also the clock of the leases returned (the global reactor's when not given). ``first``
    is the index of the replica tried first (so that many clients spread over them).
    """

    def __init__(self, http: Any, base_url: Union[str, Sequence[str]], *,
                 reactor: Any = None, timeout: Optional[float] = None, first: int = 0):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        parsed = []
        for text in urls:
            url = hyperlink.URL.from_text(text.rstrip("/"))
            if not url.host:
                raise ValueError(f"the control service URL {text!r} names no host")
            parsed.append(url)
        if not parsed:
            raise ValueError("a control service client needs at least one URL")
        if timeout is not None and reactor is None:
            raise ValueError("a timeout needs the reactor that measures it")
        if len(parsed) > 1 and timeout is None:
            raise ValueError("a client of several control service replicas needs a timeout "
                             "for each attempt, so that a replica that never answers is left")
        self._http = http
        self._urls = tuple(parsed)
        self._order = ReplicaOrder(count=len(parsed), current=first % len(parsed))
        self._reactor = reactor
        self._timeout = timeout

    @property
    def _base(self) -> str:
        return self._order.pick(self._urls).to_text()

    @property
    def host(self) -> str:
        """The host of the replica in use (or tried next)."""
        return self._order.pick(self._urls).host

    @property
    def port(self) -> int:
        """The port of the replica in use (or tried next)."""
        return self._order.pick(self._urls).port

    def __repr__(self) -> str:
        return f"<ControlClient {' '.join(url.to_text() for url in self._urls)}>"

    def seconds(self) -> float:
        """The client's clock (its ``reactor``'s): leases' ``expiration`` is measured on it."""
        clock = self._reactor
        if clock is None:
            # treq's default agent runs on the global reactor too; imported only when asked.
            from twisted.internet import reactor as clock
        return clock.seconds()

    def _lease(self, value: Any) -> Lease:
        return lease_from_json(value, self.seconds())

    async def _call(self, method: str, path: str, body: Any = None,
                    if_matches: Optional[str] = None,
                    expected: tuple[int, ...] = (200,),
                    idempotent: Optional[bool] = None) -> tuple[Any, Any]:
        """One request, on each replica in turn until one answers (see the module's
        docstring); ``idempotent`` (GET's default) says whether repeating it is harmless."""
        if idempotent is None:
            idempotent = method == "GET"
        failures: list[ControlUnreachable] = []
        # Each call walks the replicas from the one in use on its own, so that calls
        # failing together neither skip a replica nor try one twice.
        index = self._order.current
        while True:
            replica = self._urls[index]
            try:
                response, parsed, content = await self._attempt(replica, method, path, body,
                                                                if_matches)
            except ControlUnreachable as e:
                cause = e.__cause__
                if len(self._urls) > 1 and not idempotent and not never_sent(cause):
                    raise AnswerLost(e.host, e.port, e.reason, method, path) from cause
                failures.append(e)
                index = self._left(index)
                if len(failures) >= len(self._urls):
                    raise (e if len(failures) == 1 else NoReplicaAnswered(failures)) \
                        from cause
                continue
            if response.code == 503 and idempotent and len(failures) + 1 < len(self._urls):
                failures.append(ControlUnreachable(replica.host, replica.port,
                                                   "answered 503"))
                index = self._left(index)
                continue
            self._order = self._order.answered(index)
            url = replica.to_text() + API_PREFIX + path
            if response.code in expected:
                if parsed is _MISSING:
                    raise UnexpectedResponse(
                        response.code, f"{method} {url} answered {response.code} with a "
                        f"body that is not JSON: {content[:120]!r}")
                return response, parsed
            raise _error(response.code, method, url, parsed, content)

    def _left(self, index: int) -> int:
        """Replica ``index`` failed: the next to try; the client moves on from it too,
        unless another call already did."""
        if self._order.current == index:
            self._order, _ = self._order.failed_over()
        return (index + 1) % len(self._urls)

    async def _attempt(self, replica: hyperlink.URL, method: str, path: str, body: Any,
                       if_matches: Optional[str]) -> tuple[Any, Any, bytes]:
        """One request to ``replica``: its response, parsed body and raw body."""
        url = replica.to_text() + API_PREFIX + path
        headers = {b"Accept": [b"application/json"]}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers[b"Content-Type"] = [b"application/json"]
        if if_matches is not None:
            headers[b"X-If-Configuration-Matches"] = [if_matches.encode("utf-8")]
        options: dict[str, Any] = {}
        if self._timeout is not None:
            options.update(reactor=self._reactor, timeout=self._timeout)
        try:
            response = await self._http.request(method, url, headers=headers, data=data,
                                                **options)
            content = await response.content()
        except _UNREACHABLE as e:
            reason = _describe(e, replica.host)
            if reason == _NO_ANSWER and self._timeout is not None:
                reason = f"no answer within {self._timeout:g} seconds"
            raise ControlUnreachable(replica.host, replica.port, reason) from e
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = _MISSING
        return response, parsed, content

    def _parse(self, method: str, path: str, make: Callable[[Any], Any], value: Any,
               code: int = 200) -> Any:
        try:
            return make(value)
        except Malformed as e:
            raise UnexpectedResponse(
                code, f"{method} {self._base}{API_PREFIX}{path} answered with an "
                f"unexpected body: {e}") from None

    def _list_of(self, method: str, path: str, decode: Callable[[Any], Any],
                 value: Any) -> tuple:
        def make(v: Any) -> tuple:
            if not isinstance(v, list):
                raise Malformed(f"expected a JSON array, got {json.dumps(v)[:80]}")
            return tuple(decode(item) for item in v)
        return self._parse(method, path, make, value)

    def version(self) -> "Deferred[VersionInfo]":
        """The service's API (``flocker``) and software (``pyflock``) versions."""
        async def go() -> VersionInfo:
            _, body = await self._call("GET", "/version")
            return self._parse("GET", "/version", VersionInfo.from_json, body)
        return Deferred.fromCoroutine(go())

    def list_datasets(self) -> "Deferred[DatasetListing]":
        """Every configured dataset (deleted ones too) and the ``X-Configuration-Tag``."""
        async def go() -> DatasetListing:
            path = "/configuration/datasets"
            response, body = await self._call("GET", path)
            tags = response.headers.getRawHeaders(b"X-Configuration-Tag") or [None]
            tag = tags[0].decode("utf-8") if tags[0] is not None else None
            datasets = self._list_of("GET", path, dataset_from_json, body)
            return DatasetListing(datasets=datasets, tag=tag)
        return Deferred.fromCoroutine(go())

    def create_dataset(self, primary: str, maximum_size: Optional[int] = None,
                       metadata: Optional[dict[str, str]] = None,
                       dataset_id: Optional[str] = None,
                       if_matches: Optional[str] = None,
                       lease: Optional[float] = None) -> "Deferred[Dataset]":
        """Configure a new dataset on node ``primary``; the id is chosen by the service
        unless given. With ``lease`` (seconds), ``primary``'s lease on the new dataset
        is taken in the same durable write."""
        body: dict[str, Any] = {"primary": primary}
        if lease is not None:
            body["lease"] = {"expires": lease}
        if dataset_id is not None:
            body["dataset_id"] = dataset_id
        if maximum_size is not None:
            body["maximum_size"] = maximum_size
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return self._dataset_call("POST", "/configuration/datasets", body, if_matches,
                                  (201,))

    def move_dataset(self, dataset_id: str, primary: str,
                     if_matches: Optional[str] = None) -> "Deferred[Dataset]":
        """Make ``primary`` the dataset's node; its data follows."""
        return self._dataset_call("POST", _dataset_path(dataset_id), {"primary": primary},
                                  if_matches, idempotent=if_matches is None)

    def update_metadata(self, dataset_id: str, metadata: dict[str, str],
                        if_matches: Optional[str] = None) -> "Deferred[Dataset]":
        """Replace the dataset's metadata with ``metadata`` (a whole new mapping)."""
        return self._dataset_call("POST", _dataset_path(dataset_id),
                                  {"metadata": dict(metadata)}, if_matches,
                                  idempotent=if_matches is None)

    def delete_dataset(self, dataset_id: str, if_matches: Optional[str] = None,
                       purge: bool = False) -> "Deferred[Dataset]":
        """Mark the dataset deleted; its node keeps the data for the control service's
        retention period (``retained_until``), or destroys it at once if ``purge``."""
        path = _dataset_path(dataset_id) + ("?purge=true" if purge else "")
        return self._dataset_call("DELETE", path, None, if_matches)

    def restore_dataset(self, dataset_id: str, name: Optional[str] = None,
                        if_matches: Optional[str] = None) -> "Deferred[Dataset]":
        """Bring back a deleted dataset whose data is still kept, under ``name`` if given
        (``Conflict`` if its name is taken, ``Gone`` once its data went)."""
        body = None if name is None else {"metadata": {"name": name}}
        return self._dataset_call("POST", _dataset_path(dataset_id) + "/restore", body,
                                  if_matches)

    def _dataset_call(self, method: str, path: str, body: Any, if_matches: Optional[str],
                      expected: tuple[int, ...] = (200,),
                      idempotent: bool = False) -> "Deferred[Dataset]":
        async def go() -> Dataset:
            response, answer = await self._call(method, path, body, if_matches, expected,
                                                idempotent)
            return self._parse(method, path, dataset_from_json, answer,
                               response.code)
        return Deferred.fromCoroutine(go())

    def state_datasets(self) -> "Deferred[tuple[DatasetReport, ...]]":
        """The datasets as the nodes report them (a dataset being moved may be absent)."""
        return self._get_list("/state/datasets", report_from_api_json)

    def list_nodes(self) -> "Deferred[tuple[Node, ...]]":
        """The nodes the control service knows."""
        return self._get_list("/state/nodes", node_from_api_json)

    def list_leases(self) -> "Deferred[tuple[Lease, ...]]":
        """Every lease, with the seconds each has left."""
        return self._get_list("/configuration/leases", self._lease)

    def _get_list(self, path: str, decode: Callable[[Any], Any]) -> Deferred:
        async def go() -> tuple:
            _, body = await self._call("GET", path)
            return self._list_of("GET", path, decode, body)
        return Deferred.fromCoroutine(go())

    def node_by_era(self, era: str) -> "Deferred[str]":
        """The uuid of the node whose agent runs in ``era`` (``NotFound`` if none)."""
        path = "/state/nodes/by_era/" + quote(str(era), safe="")

        async def go() -> str:
            _, body = await self._call("GET", path)
            return self._parse("GET", path, lambda v: read(as_object(v, "node"), "uuid",
                                                           (str,), "node"), body)
        return Deferred.fromCoroutine(go())

    def acquire_lease(self, dataset_id: str, node_uuid: str,
                      expires: Optional[float]) -> "Deferred[Lease]":
        """Take or renew ``node_uuid``'s lease for ``expires`` seconds (None: no expiry);
        ``Conflict`` when another node holds it."""
        path = "/configuration/leases"
        body = {"dataset_id": dataset_id, "node_uuid": node_uuid, "expires": expires}

        async def go() -> Lease:
            # Taking or renewing one's own lease twice is the same as once.
            response, answer = await self._call("POST", path, body, expected=(200, 201),
                                                idempotent=True)
            return self._parse("POST", path, self._lease, answer, response.code)
        return Deferred.fromCoroutine(go())

    def release_lease(self, dataset_id: str) -> "Deferred[Lease]":
        """Drop the dataset's lease, answering the lease that was held."""
        path = "/configuration/leases/" + quote(dataset_id, safe="")

        async def go() -> Lease:
            _, answer = await self._call("DELETE", path)
            return self._parse("DELETE", path, self._lease, answer)
        return Deferred.fromCoroutine(go())

    def forget_node(self, node_uuid: str) -> "Deferred[Node]":
        """Forget dead node ``node_uuid`` (``Conflict`` while it is alive or holds a dataset
        or lease, ``NotFound`` if unknown), answering the node forgotten."""
        path = "/state/nodes/" + quote(node_uuid, safe="")

        async def go() -> Node:
            _, answer = await self._call("DELETE", path)
            return self._parse("DELETE", path, node_from_api_json, answer)
        return Deferred.fromCoroutine(go())

    def control_status(self) -> "Deferred[dict]":
        """Issue 9: ``GET /v1/state/control``, the control service's replicas, the one that
        leads and the etcd members, as the API's JSON object."""
        path = "/state/control"

        def make(value: Any) -> dict:
            obj = as_object(value, "control status")
            read_list(obj, "replicas", "control status")
            read_list(obj, "etcd_members", "control status")
            return obj

        async def go() -> dict:
            _, answer = await self._call("GET", path)
            return self._parse("GET", path, make, answer)
        return Deferred.fromCoroutine(go())

    # -- join tokens (issue 10) -----------------------------------------------------------

    def create_token(self, ttl: Optional[float] = None,
                     uses: Optional[int] = None) -> "Deferred[TokenInfo]":
        """A new join token valid ``ttl`` seconds for ``uses`` joins (the service's
        defaults where None); its ``token`` is the only copy of the secret."""
        body = {key: value for key, value in (("ttl", ttl), ("uses", uses))
                if value is not None}

        async def go() -> TokenInfo:
            response, answer = await self._call("POST", "/tokens", body, expected=(201,))
            return self._parse("POST", "/tokens", TokenInfo.from_json, answer, 201)
        return Deferred.fromCoroutine(go())

    def list_tokens(self) -> "Deferred[tuple[TokenInfo, ...]]":
        """Every join token, without secrets."""
        return self._get_list("/tokens", TokenInfo.from_json)

    def revoke_token(self, token_id: str) -> "Deferred[TokenInfo]":
        """Revoke join token ``token_id``, answering the token revoked."""
        path = "/tokens/" + quote(token_id, safe="")

        async def go() -> TokenInfo:
            _, answer = await self._call("DELETE", path)
            return self._parse("DELETE", path, TokenInfo.from_json, answer)
        return Deferred.fromCoroutine(go())


def _dataset_path(dataset_id: str) -> str:
    return "/configuration/datasets/" + quote(dataset_id, safe="")


def _error(code: int, method: str, url: str, parsed: Any, content: bytes) -> ControlError:
    """The typed error for a refusal, keeping the service's own description."""
    kind = _ERRORS_BY_CODE.get(code, ControlError)
    if isinstance(parsed, dict) and isinstance(parsed.get("description"), str):
        errors = parsed.get("errors")
        errors = [str(e) for e in errors] if isinstance(errors, list) else []
        holder = parsed.get("holder")
        zones = parsed.get("zones")
        zones = (zones.get("source"), zones.get("target")) if isinstance(zones, dict) \
            else ()
        if kind is Conflict and isinstance(holder, str):
            return Conflict(code, parsed["description"], errors, holder=holder.lower())
        if kind is Conflict and len(zones) == 2 and all(isinstance(z, str) for z in zones):
            return Conflict(code, parsed["description"], errors, zones=zones)
        return kind(code, parsed["description"], errors)
    text = content[:200].decode("utf-8", "replace").strip()
    return kind(code, f"{method} {url} failed with HTTP {code}"
                      + (f": {text}" if text else ""))

