"""
Mutual TLS between pyflock's processes, on top of Twisted's OpenSSL support.

Every port pyflock listens on (REST API, agent channel, peer transfer) presents a
certificate signed by the cluster CA and requires the client to present one signed by the
same CA; a connection without one, or with another cluster's, fails in the handshake.
What a verified client may do is decided by its ``Identity``, read from its certificate's
common name (``user-<name>``, ``node-<uuid>``, ``control-service``).

A certificates folder holds ``cluster.crt`` and one ``<name>.crt`` / ``<name>.key`` pair per
role this host plays (``control-service``, ``node``, or a user name).
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Optional, Union
from uuid import UUID

import attr
from cryptography import x509
from OpenSSL import SSL, crypto
from treq.client import HTTPClient
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ServerEndpoint, serverFromString, wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator, IStreamClientEndpoint, IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    Certificate, CertificateOptions, TLSVersion,
    VerificationError, optionsForClientTLS, trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pyflock.common._ca import (
    AUTHORITY_CERTIFICATE, CertificateFileError, PathLike, USER_NAME, check_key_matches,
    cluster_uuid_of, common_name_of, load_certificate, load_private_key,
    read_cluster_uuid,
)

_log = Logger()

#: The oldest TLS version pyflock speaks or accepts.
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

_KINDS = ("user", "node", "control")

# Canonical 8-4-4-4-12 form only: a certificate naming a node must name it one way.
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")


def _check_identity(instance: "Identity", attribute, value) -> None:
    """attrs validator: ``name`` must be well-formed for ``kind``."""
    if instance.kind == "user" and not USER_NAME.match(value):
        raise ValueError(f"invalid user name {value!r}")
    if instance.kind == "node" and (not _UUID.match(value) or value != value.lower()):
        raise ValueError(f"invalid node uuid {value!r}: give it lower-case, 8-4-4-4-12")
    if instance.kind == "control" and value != "service":
        raise ValueError(f"the control service's identity is named 'service', not {value!r}")


@attr.s(frozen=True, auto_attribs=True)
class Identity:
    """
    Who a verified certificate belongs to: ``kind`` "user" (``name`` = user name),
    "node" (``name`` = lower-case node uuid) or "control" (``name`` = "service").
    """

    kind: str = attr.ib(validator=attr.validators.in_(_KINDS))
    name: str = attr.ib(validator=[attr.validators.instance_of(str), _check_identity])

    @classmethod
    def user(cls, name: str) -> "Identity":
        """The identity of API user ``name``."""
        return cls(kind="user", name=name)

    @classmethod
    def node(cls, node_uuid: Union[str, UUID]) -> "Identity":
        """The identity of the node ``node_uuid``."""
        return cls(kind="node", name=str(UUID(str(node_uuid))))

    @classmethod
    def control(cls) -> "Identity":
        """The identity of the control service."""
        return cls(kind="control", name="service")

    @classmethod
    def from_common_name(cls, common_name: str) -> Optional["Identity"]:
        """The identity a certificate common name denotes, or None if it denotes none."""
        if not isinstance(common_name, str):
            return None
        if common_name == "control-service":
            return cls.control()
        kind, separator, name = common_name.partition("-")
        if not separator:
            return None
        if kind == "user" and USER_NAME.match(name):
            return cls.user(name)
        if kind == "node" and _UUID.match(name):
            return cls(kind="node", name=name.lower())
        return None

    @property
    def common_name(self) -> str:
        """The certificate common name of this identity."""
        return f"{self.kind}-{self.name}"

    @property
    def node_uuid(self) -> Optional[str]:
        """The node's uuid for a node identity, else None."""
        return self.name if self.kind == "node" else None


def identity_of_certificate(certificate, cluster_uuid: str) -> Optional[Identity]:
    """
    The identity of ``certificate`` (pyOpenSSL or cryptography) if its OU is
    ``cluster_uuid``, else None. It does not check the signature: TLS already did.
    """
    if isinstance(certificate, crypto.X509):
        certificate = certificate.to_cryptography()
    if cluster_uuid_of(certificate) != str(UUID(str(cluster_uuid))):
        return None
    common_name = common_name_of(certificate)
    return None if common_name is None else Identity.from_common_name(common_name)


def peer_identity(transport, cluster_uuid: str) -> Optional[Identity]:
    """
    The identity of the client certificate on a TLS connection, or None (no TLS, no
    certificate, another cluster's OU, or a common name that is no identity).

    ``transport`` is the TLS transport: in a twisted.web or Klein handler, pass
    ``request.transport`` (the same object as ``request.channel.transport``); in a plain
    protocol, ``self.transport``. ``cluster_uuid`` is ours, from ``read_cluster_uuid``.
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    try:
        certificate = get_peer_certificate()
    except SSL.Error:
        return None
    if certificate is None:
        return None
    return identity_of_certificate(certificate, cluster_uuid)


@attr.s(frozen=True, auto_attribs=True)
class _Credentials:
    """A certificates folder loaded for one role, as Twisted wants it."""

    authority: Certificate
    certificate: x509.Certificate
    key: object
    cluster_uuid: str


def _twisted_certificate(certificate: x509.Certificate) -> Certificate:
    """``certificate`` as Twisted's ``Certificate``, for a trust root."""
    # pyOpenSSL deprecates its own X509 objects for a connection's certificate, but its
    # trust store still takes only those.
    return Certificate(crypto.X509.from_cryptography(certificate))


def _load_twisted_certificate(path: PathLike) -> Certificate:
    """The PEM certificate in ``path`` as Twisted's ``Certificate``."""
    return _twisted_certificate(load_certificate(path))


def _load_credentials(certificates_directory: PathLike,
                      certificate_name: str) -> _Credentials:
    """
    Load ``cluster.crt`` and ``<certificate_name>.crt/.key`` from the folder, checking that
    the key matches and the CA issued the certificate; ``CertificateFileError`` otherwise.
    """
    folder = Path(certificates_directory)
    authority_path = folder / AUTHORITY_CERTIFICATE
    certificate_path = folder / f"{certificate_name}.crt"
    key_path = folder / f"{certificate_name}.key"
    authority = load_certificate(authority_path)
    cluster_uuid = read_cluster_uuid(authority_path)
    certificate = load_certificate(certificate_path)
    key = load_private_key(key_path)
    check_key_matches(certificate, key, key_path, certificate_path)
    try:
        certificate.verify_directly_issued_by(authority)
    except Exception:
        raise CertificateFileError(
            certificate_path, f"not issued by this cluster's CA ({authority_path})"
        ) from None
    return _Credentials(
        authority=_twisted_certificate(authority),
        certificate=certificate, key=key, cluster_uuid=cluster_uuid,
    )


def server_tls_options(certificates_directory: PathLike,
                       certificate_name: str) -> CertificateOptions:
    """
    Server TLS options presenting ``<certificate_name>.crt/.key`` and requiring a client
    certificate issued by the folder's ``cluster.crt``; TLS 1.2 or later.
    """
    credentials = _load_credentials(certificates_directory, certificate_name)
    options = CertificateOptions(
        privateKey=credentials.key,
        certificate=credentials.certificate,
        # A trust root makes Twisted verify the peer and require its certificate.
        trustRoot=trustRootFromCertificates([credentials.authority]),
        raiseMinimumTo=MINIMUM_TLS_VERSION,
    )
    # A connection's client certificate never changes (ConnectionIdentities caches it).
    options.getContext().set_options(SSL.OP_NO_RENEGOTIATION)
    return options


class ConnectionIdentities:
    """
    ``identify(request)`` for a twisted.web site: the caller's identity, worked out once
    per TLS connection (servers refuse renegotiation, so it cannot change).
    """

    def __init__(self, cluster_uuid: str):
        self._cluster_uuid = cluster_uuid
        self._known: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __call__(self, request) -> Optional[Identity]:
        transport = request.transport
        try:
            return self._known[transport]
        except (KeyError, TypeError):
            pass
        identity = peer_identity(transport, self._cluster_uuid)
        if identity is not None:
            self._known[transport] = identity
        return identity


@implementer(IOpenSSLClientConnectionCreator)
class _IdentityVerifyingCreator:
    """Client TLS that accepts only a server whose certificate is ``expected``'s."""

    def __init__(self, options: CertificateOptions, expected: Identity, cluster_uuid: str):
        self._options = options
        self._expected = expected
        self._cluster_uuid = cluster_uuid

    def clientConnectionForTLS(self, tls_protocol):
        """A client connection that checks the server's identity after its chain."""
        connection = self._options.clientConnectionForTLS(tls_protocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                              self._callback(tls_protocol))
        return connection

    def _callback(self, tls_protocol):
        """The OpenSSL verify callback for one connection."""
        protocol = tls_protocol

        def verify(connection, certificate, error_number, depth, ok):
            nonlocal protocol
            if depth != 0 or not ok:
                return ok
            try:
                identity = identity_of_certificate(certificate, self._cluster_uuid)
                if identity == self._expected:
                    return True
                # Exceptions raised inside an OpenSSL callback are lost; failVerification
                # is how the reason reaches the connection's connectionLost.
                protocol.failVerification(Failure(VerificationError(
                    f"the server is {identity.common_name if identity else 'no identity'}"
                    f", not {self._expected.common_name}")))
                return False
            except BaseException:
                _log.failure("while verifying the server's identity")
                return False
            finally:
                protocol = None
        return verify


def client_tls_options(certificates_directory: PathLike, certificate_name: str,
                       hostname: Optional[str] = None, *,
                       expected_identity: Optional[Identity] = None
                       ) -> IOpenSSLClientConnectionCreator:
    """
    Client TLS options trusting only the folder's ``cluster.crt`` and presenting
    ``<certificate_name>.crt/.key``. Give exactly one of ``hostname`` (the server's
    certificate must carry it as subjectAltName: the control service) or
    ``expected_identity`` (its certificate must be that identity's: a peer node).
    """
    if (hostname is None) == (expected_identity is None):
        raise ValueError("give exactly one of hostname and expected_identity")
    return _client_options(_load_credentials(certificates_directory, certificate_name),
                           hostname, expected_identity)


def _client_options(credentials: _Credentials, hostname: Optional[str],
                    expected_identity: Optional[Identity]
                    ) -> IOpenSSLClientConnectionCreator:
    """Client TLS options for loaded ``credentials``; see ``client_tls_options``."""
    trust = trustRootFromCertificates([credentials.authority])
    if expected_identity is None:
        return optionsForClientTLS(
            hostname, trustRoot=trust, extraCertificateOptions={
                "privateKey": credentials.key, "certificate": credentials.certificate,
                "raiseMinimumTo": MINIMUM_TLS_VERSION})
    options = CertificateOptions(
        privateKey=credentials.key, certificate=credentials.certificate,
        trustRoot=trust, raiseMinimumTo=MINIMUM_TLS_VERSION)
    return _IdentityVerifyingCreator(options, expected_identity, credentials.cluster_uuid)


@implementer(IPolicyForHTTPS)
class ClusterTLSPolicy:
    """
    ``IPolicyForHTTPS`` for a cluster: trust only ``cluster.crt``, present
    ``<certificate_name>.crt/.key``, and check each server's host name (or, given
    ``expected_identity``, its identity) against its certificate.
    """

    def __init__(self, certificates_directory: PathLike, certificate_name: str, *,
                 expected_identity: Optional[Identity] = None):
        self._credentials = _load_credentials(certificates_directory, certificate_name)
        self._expected_identity = expected_identity
        self._creators: dict = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The client connection creator for ``https://hostname:port``."""
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        host = host.strip("[]")
        key = None if self._expected_identity is not None else host
        # One creator (hence one OpenSSL context) per host, rather than one per connection.
        if key not in self._creators:
            self._creators[key] = _client_options(
                self._credentials, None if key is None else host, self._expected_identity)
        return self._creators[key]


def client_tls_policy(certificates_directory: PathLike, certificate_name: str, *,
                      expected_identity: Optional[Identity] = None) -> ClusterTLSPolicy:
    """
    The HTTPS policy for ``twisted.web.client.Agent`` / treq: trust only the folder's
    ``cluster.crt``, present ``<certificate_name>.crt/.key``, verify the server's host name
    (or ``expected_identity``) against its certificate.
    """
    return ClusterTLSPolicy(certificates_directory, certificate_name,
                            expected_identity=expected_identity)


def treq_client(reactor, certificates_directory: PathLike, certificate_name: str, *,
                pool: Optional[HTTPConnectionPool] = None,
                expected_identity: Optional[Identity] = None) -> HTTPClient:
    """
    A treq ``HTTPClient`` speaking mutual TLS with ``client_tls_policy``, over ``pool``
    (a new persistent pool if None; whoever passes a pool closes it with
    ``pool.closeCachedConnections()``).
    """
    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=True)
    policy = client_tls_policy(certificates_directory, certificate_name,
                               expected_identity=expected_identity)
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))


@implementer(IStreamServerEndpoint)
@attr.s(frozen=True, auto_attribs=True)
class _TLSServerEndpoint:
    """A stream server endpoint that speaks TLS over a wrapped one."""

    _wrapped: IStreamServerEndpoint
    _options: object
    _clock: object

    def listen(self, protocolFactory):
        """Listen on the wrapped endpoint, every connection wrapped in TLS."""
        return self._wrapped.listen(
            TLSMemoryBIOFactory(self._options, False, protocolFactory, clock=self._clock))


def _check_port_number(number: int, given) -> int:
    """``number`` if it is a TCP port number (0 picks a free one), else ValueError."""
    if not 0 <= number <= 65535:
        raise ValueError(f"invalid port {given!r}: a port number is 0 to 65535")
    return number


def tcp_server_endpoint(reactor, port: Union[int, str]) -> IStreamServerEndpoint:
    """
    The plain TCP endpoint ``port`` names: a number (``4523``, ``"4523"``) listening on
    every interface, or a Twisted ``tcp:`` endpoint string
    (``"tcp:4523:interface=127.0.0.1"``); ``ValueError`` for anything else.
    """
    if isinstance(port, int) and not isinstance(port, bool):
        return TCP4ServerEndpoint(reactor, _check_port_number(port, port))
    if not isinstance(port, str):
        raise ValueError(f"invalid port {port!r}: give a number or a tcp: endpoint")
    if port.isascii() and port.isdigit():
        return TCP4ServerEndpoint(reactor, _check_port_number(int(port), port))
    if not port.startswith("tcp:"):
        raise ValueError(
            f"invalid port {port!r}: give a port number (4523) or a tcp: endpoint "
            "(tcp:4523:interface=127.0.0.1); TLS is always on, so ssl: and other "
            "endpoint types are not accepted")
    try:
        endpoint = serverFromString(reactor, port)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"invalid port {port!r}: {e}") from None
    number = getattr(endpoint, "_port", None)
    if isinstance(number, int):
        _check_port_number(number, port)
    return endpoint


def tls_server_endpoint(reactor, port: Union[int, str],
                        options) -> IStreamServerEndpoint:
    """
    A server endpoint on ``port`` (see ``tcp_server_endpoint``) where every connection
    speaks TLS with ``options`` (from ``server_tls_options``).
    """
    return _TLSServerEndpoint(tcp_server_endpoint(reactor, port), options, reactor)


def tls_client_endpoint(reactor, host: str, port: int,
                        options: IOpenSSLClientConnectionCreator) -> IStreamClientEndpoint:
    """A client endpoint to ``host:port`` speaking TLS with ``options``."""
    return wrapClientTLS(options, HostnameEndpoint(reactor, host, port))


__all__ = [
    "ClusterTLSPolicy", "Identity", "MINIMUM_TLS_VERSION", "client_tls_options",
    "client_tls_policy", "identity_of_certificate", "peer_identity", "read_cluster_uuid",
    "server_tls_options", "tcp_server_endpoint", "tls_client_endpoint",
    "tls_server_endpoint", "treq_client",
]
