"""
Mutual TLS between pyflock's processes, on top of Twisted's OpenSSL support.

Every port pyflock listens on (REST API, agent channel, peer transfer) presents a
certificate signed by the cluster CA and requires the client to present one signed by the
same CA; a connection without one, or with another cluster's, fails in the handshake.
What a verified client may do is decided by its ``Identity``, read from its certificate's
common name (``user-<name>``, ``node-<uuid>``, ``control-service``).

A certificates folder holds ``cluster.crt`` and one ``<name>.crt`` / ``<name>.key`` pair per
role this host plays (``control-service``, ``node``, or a user name).

``ClusterTLS`` is the one factory of TLS contexts: every listener takes a ``Role`` (which
certificates it accepts: ``REST_API``, ``AGENT_CHANNEL``, ``PEER_TRANSFER``) and every
client the identity of the server it expects. ``PeerCheck`` is the one place a peer's
certificate is judged, on both sides; revocation (``cluster.crl``) joins it there.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Callable, Optional, Union
from uuid import UUID

import attr
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import CertificateError as ServiceIdentityCertificateError
from service_identity import VerificationError as ServiceIdentityError
from service_identity.cryptography import (
    verify_certificate_hostname, verify_certificate_ip_address,
)
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ServerEndpoint, serverFromString, wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator, IStreamClientEndpoint, IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    AcceptableCiphers, Certificate, CertificateOptions, TLSVersion, trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pyflock.common._connections import ConnectionLimits, guarded_tls_factory
from pyflock.common._ca import (
    AUTHORITY_CERTIFICATE, CertificateFileError, PathLike, USER_NAME, check_key_matches,
    cluster_uuid_of, common_name_of, load_certificate, load_private_key,
    read_cluster_uuid,
)

_log = Logger()

#: The oldest TLS version pyflock speaks or accepts.
MINIMUM_TLS_VERSION = TLSVersion.TLSv1_2

#: The TLS 1.2 cipher suites pyflock speaks or accepts (issue 8): forward secrecy (ECDHE)
#: and authenticated encryption (AES-GCM, ChaCha20-Poly1305) only; no CBC, no SHA-1 MACs.
#: TLS 1.3's suites are all of that kind, and OpenSSL's defaults for them are kept.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_ACCEPTABLE_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS)

#: OpenSSL's ``SSL_MODE_ENABLE_PARTIAL_WRITE`` (ssl.h), which pyOpenSSL sets on every
#: context and does not name: with it, ``SSL_write`` stops after each 16 KiB record.
#: pyflock's TLS always writes into a memory BIO (Twisted's, ``BlockingTLS``'s), which
#: takes any amount, so without it one ``send`` encrypts a whole buffer: an 18 MB list
#: is one call per chunk instead of one per record.
_MODE_ENABLE_PARTIAL_WRITE = 0x1


def tls_options(**kwargs) -> CertificateOptions:
    """
    ``CertificateOptions(**kwargs)`` with pyflock's settings: TLS 1.2 or later, the AEAD
    suites of ``TLS12_CIPHERS``, no renegotiation. Every TLS context of pyflock is one.
    """
    options = CertificateOptions(raiseMinimumTo=MINIMUM_TLS_VERSION,
                                 acceptableCiphers=_ACCEPTABLE_CIPHERS, **kwargs)
    context = options.getContext()
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    context.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
    return options


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
    certificate = _cryptography(certificate)
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
    certificate = _peer_certificate(transport)
    if certificate is None:
        return None
    return identity_of_certificate(certificate, cluster_uuid)


# -- who may connect: roles, admissions and the one identity check -------------------------


@attr.s(frozen=True, auto_attribs=True)
class Role:
    """
    What a listener is for (``name``, said in refusals) and which identity kinds it
    accepts (``kinds``: "user", "node"; in the order refusals list them).
    """

    name: str
    kinds: tuple = attr.ib(converter=tuple)

    @kinds.validator
    def _check_kinds(self, attribute, value) -> None:
        """Every kind is an identity kind, and there is at least one."""
        if not value or not set(value) <= set(_KINDS):
            raise ValueError(f"a role accepts some of {', '.join(_KINDS)}, not {value!r}")

    @property
    def accepted(self) -> str:
        """The certificates this role accepts, as refusals name them ("node-*")."""
        return " or ".join(f"{kind}-*" for kind in self.kinds)

    def admit(self, identity: Optional[Identity]) -> "Admission":
        """Whether a verified peer of ``identity`` (None: no identity) may use it (pure)."""
        if identity is None:
            return Admission(None, f"the {self.name} accepts only {self.accepted} "
                                   f"certificates signed by this cluster's CA; this "
                                   f"certificate names no pyflock identity")
        if identity.kind not in self.kinds:
            return Admission(identity, f"the {self.name} accepts only {self.accepted} "
                                       f"certificates; this connection presented "
                                       f"{identity.common_name}")
        return Admission(identity)


#: The REST API (4523): users and nodes (what a node may do, the API decides).
REST_API = Role("REST API", ("user", "node"))

#: The agent channel (4524): nodes only.
AGENT_CHANNEL = Role("agent channel", ("node",))

#: Peer data transfer (4525): nodes only (which node, the move decides).
PEER_TRANSFER = Role("peer transfer", ("node",))

# The join port (4526) takes clients without a certificate: it has a server context of its
# own that requests none (``ClusterTLS.join_listener``), and no Role (its exchange checks a
# token instead).


@attr.s(frozen=True, auto_attribs=True)
class Admission:
    """
    The verdict on a connection's peer: its ``identity`` (None if it has none) and why it
    is refused (``refusal``, None when it is admitted).
    """

    identity: Optional[Identity]
    refusal: Optional[str] = None

    @property
    def admitted(self) -> bool:
        """Whether the peer may use the listener."""
        return self.refusal is None


class PeerRefused(Exception):
    """A peer's certificate is not the one expected (or is revoked); the text says why."""


def _cryptography(certificate) -> x509.Certificate:
    """``certificate`` (pyOpenSSL's, as TLS gives it, or cryptography's) as cryptography's."""
    if isinstance(certificate, crypto.X509):
        return certificate.to_cryptography()
    return certificate


def never_revoked(certificate: x509.Certificate) -> bool:
    """No certificate is revoked: the check until the revocation list is read."""
    return False


class PeerCheck:
    """
    The one place a peer's certificate is judged, by every listener and every client,
    after TLS has verified its chain to ``cluster.crt``: its cluster (OU) and identity
    (CN), then revocation (``is_revoked(certificate)``: the revocation list ``cluster.crl``
    joins here), then what the listener's role accepts or the identity a client expects.
    """

    def __init__(self, cluster_uuid: str,
                 is_revoked: Callable[[x509.Certificate], bool] = never_revoked):
        self.cluster_uuid = cluster_uuid
        self._is_revoked = is_revoked

    def _judge(self, certificate: x509.Certificate
               ) -> tuple[Optional[Identity], Optional[str]]:
        """The certificate's identity, and why it counts for nothing (revoked), if it does."""
        return (identity_of_certificate(certificate, self.cluster_uuid),
                self.revocation(certificate))

    def revocation(self, certificate) -> Optional[str]:
        """Why ``certificate`` (pyOpenSSL or cryptography) counts for nothing: it is
        revoked; None if it is not."""
        certificate = _cryptography(certificate)
        if not self._is_revoked(certificate):
            return None
        return (f"the certificate {common_name_of(certificate)} (serial "
                f"{certificate.serial_number:x}) is revoked")

    def verify_client(self, connection, certificate, error_number, depth, ok) -> bool:
        """
        A server's OpenSSL verify callback: the chain as OpenSSL judged it, and a revoked
        client certificate refused in the handshake, before any request is read.
        """
        if depth != 0 or not ok:
            return ok
        try:
            reason = self.revocation(certificate)
        except BaseException:
            _log.failure("while checking a client certificate's revocation")
            return False
        if reason is not None:
            _log.warn("pyflock:tls:revoked-refused {reason}", reason=reason,
                      event_type="pyflock:tls:revoked-refused")
        return reason is None

    def still_acceptable(self, certificate, now: float) -> Optional[str]:
        """
        Why the peer of an open connection, which presented ``certificate``, may no
        longer stay connected at ``now`` (POSIX seconds), or None while it may: the
        certificate has expired (or is not valid yet), or is revoked. Listeners ask
        this every ``ConnectionLimits.recheck`` seconds; the place for any later check
        of a certificate that was accepted once (the CRL joins through ``is_revoked``).
        """
        certificate = _cryptography(certificate)
        identity, revoked = self._judge(certificate)
        if revoked is not None:
            return revoked
        name = identity.common_name if identity else common_name_of(certificate)
        if now >= certificate.not_valid_after_utc.timestamp():
            return (f"the certificate {name} expired at "
                    f"{certificate.not_valid_after_utc.isoformat()}")
        if now < certificate.not_valid_before_utc.timestamp():
            return f"the certificate {name} is not valid yet"
        return None

    def admit_certificate(self, certificate, role: Role) -> Admission:
        """Whether the peer presenting ``certificate`` (None: none) may use ``role``."""
        if certificate is None:
            return role.admit(None)
        identity, revoked = self._judge(_cryptography(certificate))
        if revoked is not None:
            return Admission(identity, revoked)
        return role.admit(identity)

    def admit(self, transport, role: Role) -> Admission:
        """Whether the peer of a TLS ``transport`` (see ``peer_identity``) may use ``role``."""
        return self.admit_certificate(_peer_certificate(transport), role)

    def check_server(self, certificate, expected: Identity,
                     hostname: Optional[str] = None) -> Optional[Exception]:
        """
        Why a server presenting ``certificate`` is not ``expected`` reached as
        ``hostname`` (checked against its subjectAltNames when given), or None if it is.
        """
        certificate = _cryptography(certificate)
        identity, revoked = self._judge(certificate)
        if revoked is not None:
            return PeerRefused(revoked)
        if identity != expected:
            return PeerRefused(
                f"the server is {identity.common_name if identity else 'no identity'}"
                f", not {expected.common_name}")
        if hostname is not None:
            try:
                if isIPAddress(hostname) or isIPv6Address(hostname):
                    verify_certificate_ip_address(certificate, hostname)
                else:
                    verify_certificate_hostname(certificate, hostname)
            except (ServiceIdentityError, ServiceIdentityCertificateError) as e:
                return e
        return None


class ConnectionIdentities:
    """
    ``identify(request)`` for a twisted.web site listening as ``role``: the caller's
    identity if ``check`` admits it, else None; judged once per TLS connection (servers
    refuse renegotiation, so the certificate cannot change).
    """

    def __init__(self, check: PeerCheck, role: Role):
        self._check = check
        self._role = role
        self._known: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __call__(self, request) -> Optional[Identity]:
        transport = request.transport
        try:
            admission = self._known[transport]
        except (KeyError, TypeError):
            admission = self._check.admit(transport, self._role)
            if admission.identity is not None:
                self._known[transport] = admission
        return admission.identity if admission.admitted else None


# -- the one TLS context factory -----------------------------------------------------------


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


@attr.s(frozen=True, auto_attribs=True)
class Listener:
    """One listening port: its TLS ``endpoint``, and who it admits (``role``)."""

    endpoint: IStreamServerEndpoint
    role: Role
    check: PeerCheck

    def admit(self, transport) -> Admission:
        """Whether the peer of a connection to this port may use it."""
        return self.check.admit(transport, self.role)

    def identities(self) -> ConnectionIdentities:
        """``identify(request)`` for a twisted.web site on this port."""
        return ConnectionIdentities(self.check, self.role)


class ClusterTLS:
    """
    The one TLS context factory of a process: made once from a certificates folder and
    the name of the certificate this process presents, it makes every listener
    (``listener``: REST API, agent channel, peer transfer) and every client
    (``client_options``, ``client_endpoint``, ``http_policy``, ``treq_client``), all
    with mutual TLS, TLS 1.2 or later, trusting only ``cluster.crt``, and judges every
    peer with one ``PeerCheck`` (``check``).
    """

    def __init__(self, credentials: _Credentials, check: PeerCheck):
        self._credentials = credentials
        self.check = check
        self._server_options: Optional[CertificateOptions] = None

    @classmethod
    def load(cls, certificates_directory: PathLike, certificate_name: str, *,
             is_revoked: Callable[[x509.Certificate], bool] = never_revoked
             ) -> "ClusterTLS":
        """
        Load ``cluster.crt`` and ``<certificate_name>.crt/.key`` from the folder;
        ``CertificateFileError`` if they are missing, do not match or another CA issued
        the certificate.
        """
        credentials = _load_credentials(certificates_directory, certificate_name)
        return cls(credentials, PeerCheck(credentials.cluster_uuid, is_revoked))

    @property
    def cluster_uuid(self) -> str:
        """This cluster's uuid (the OU of ``cluster.crt``)."""
        return self._credentials.cluster_uuid

    def _trust(self):
        """The trust root: this cluster's CA only."""
        return trustRootFromCertificates([self._credentials.authority])

    def server_options(self) -> CertificateOptions:
        """
        The server options every listener shares: present this certificate, require a
        client certificate issued by ``cluster.crt``, refuse renegotiation; TLS 1.2 or later.
        """
        if self._server_options is None:
            credentials = self._credentials
            # A trust root makes Twisted verify the peer and require its certificate; no
            # renegotiation, so a connection's client certificate never changes
            # (ConnectionIdentities caches what it admitted).
            options = tls_options(
                privateKey=credentials.key, certificate=credentials.certificate,
                trustRoot=self._trust())
            # A revoked client certificate fails the handshake (Twisted's own callback,
            # replaced here, accepts whatever OpenSSL accepted).
            options.getContext().set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
                self.check.verify_client)
            self._server_options = options
        return self._server_options

    def listener(self, reactor, port: Union[int, str], role: Role,
                 limits: ConnectionLimits = ConnectionLimits()) -> Listener:
        """
        The TLS listener on ``port`` (see ``tcp_server_endpoint``) admitting ``role``,
        guarded by ``limits``: its peers' certificates are re-judged every
        ``limits.recheck`` seconds (``PeerCheck.still_acceptable``).
        """
        return Listener(tls_server_endpoint(reactor, port, self.server_options(), limits,
                                            self.check.still_acceptable),
                        role, self.check)

    def join_listener(self, reactor, port: Union[int, str],
                      limits: ConnectionLimits = ConnectionLimits()) -> IStreamServerEndpoint:
        """
        The join port's TLS endpoint on ``port``: server-authenticated only (this
        certificate), requesting no client certificate, TLS 1.2 or later; a joining host
        has no certificate yet, and proves itself with a token inside.
        """
        credentials = self._credentials
        options = tls_options(privateKey=credentials.key, certificate=credentials.certificate)
        return tls_server_endpoint(reactor, port, options, limits)

    def client_options(self, expected: Identity, hostname: Optional[str] = None
                       ) -> IOpenSSLClientConnectionCreator:
        """
        Client options presenting this certificate and accepting only a server whose
        certificate is ``expected``'s; the control service's must also carry
        ``hostname`` (the name it is reached by) as subjectAltName. Node certificates
        carry no host names: a node is known by its identity alone.
        """
        if (expected.kind == "control") != (hostname is not None):
            raise ValueError("give the host name of the control service, and only of it")
        credentials = self._credentials
        options = tls_options(privateKey=credentials.key, certificate=credentials.certificate,
                              trustRoot=self._trust())
        return _ServerCheckingCreator(options, expected, self.check, hostname)

    def client_endpoint(self, reactor, host: str, port: int,
                        expected: Identity) -> IStreamClientEndpoint:
        """A TLS client endpoint to ``host:port`` accepting only ``expected`` as server."""
        hostname = host if expected.kind == "control" else None
        return tls_client_endpoint(reactor, host, port,
                                   self.client_options(expected, hostname))

    def http_policy(self, expected: Optional[Identity] = None) -> "ClusterTLSPolicy":
        """The HTTPS policy for ``Agent``/treq; the server is ``expected`` (the control)."""
        return ClusterTLSPolicy(self, Identity.control() if expected is None else expected)

    def treq_client(self, reactor, *, pool: Optional[HTTPConnectionPool] = None,
                    expected: Optional[Identity] = None) -> HTTPClient:
        """
        A treq ``HTTPClient`` over ``http_policy(expected)`` and ``pool`` (a new
        persistent pool if None; whoever passes a pool closes it).
        """
        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
        return HTTPClient(Agent(reactor, contextFactory=self.http_policy(expected),
                                pool=pool))


def _peer_certificate(transport):
    """The peer's certificate on a TLS ``transport``, or None (no TLS, none presented)."""
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    try:
        return get_peer_certificate()
    except SSL.Error:
        return None


@implementer(IOpenSSLClientConnectionCreator)
class _ServerCheckingCreator:
    """
    Client TLS with ``options`` where ``check`` accepts only the server ``expected``,
    reached as ``hostname`` (sent as SNI when it is a DNS name).
    """

    def __init__(self, options: CertificateOptions, expected: Identity, check: PeerCheck,
                 hostname: Optional[str] = None):
        self._options = options
        self._expected = expected
        self._check = check
        self._hostname = hostname

    def clientConnectionForTLS(self, tls_protocol):
        """A client connection that checks the server's identity after its chain."""
        connection = self._options.clientConnectionForTLS(tls_protocol)
        hostname = self._hostname
        if hostname is not None and not (isIPAddress(hostname) or isIPv6Address(hostname)):
            connection.set_tlsext_host_name(hostname.encode("idna"))
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
                error = self._check.check_server(certificate, self._expected,
                                                 self._hostname)
                if error is None:
                    return True
                # Exceptions raised inside an OpenSSL callback are lost; failVerification
                # is how the reason reaches the connection's connectionLost.
                protocol.failVerification(Failure(error))
                return False
            except BaseException:
                _log.failure("while verifying the server's identity")
                return False
            finally:
                protocol = None
        return verify


@implementer(IPolicyForHTTPS)
class ClusterTLSPolicy:
    """
    ``IPolicyForHTTPS`` for a cluster (``ClusterTLS.http_policy``): each server must be
    ``expected``; the control service must also carry the URL's host name.
    """

    def __init__(self, tls: ClusterTLS, expected: Identity):
        self._tls = tls
        self._expected = expected
        self._creators: dict = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The client connection creator for ``https://hostname:port``."""
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        host = host.strip("[]") if self._expected.kind == "control" else None
        # One creator (hence one OpenSSL context) per host, rather than one per connection.
        if host not in self._creators:
            self._creators[host] = self._tls.client_options(self._expected, host)
        return self._creators[host]


@implementer(IPolicyForHTTPS)
class JoinPolicy:
    """
    ``IPolicyForHTTPS`` of a host that joins and has no certificate yet: with
    ``authority`` (the CA certificate it checked against its token's pin), only the
    control service of that CA reached by the URL's host name; without, any server (only
    for fetching the CA certificate, whose pin the caller checks before trusting it).
    """

    def __init__(self, authority: Optional[x509.Certificate] = None):
        self._authority = authority

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The client connection creator for ``https://hostname:port``."""
        if self._authority is None:
            return tls_options()
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        host = host.strip("[]")
        cluster_uuid = cluster_uuid_of(self._authority) or ""
        options = tls_options(
            trustRoot=trustRootFromCertificates([_twisted_certificate(self._authority)]))
        return _ServerCheckingCreator(options, Identity.control(), PeerCheck(cluster_uuid),
                                      host)


# -- the same, from a certificates folder in one call --------------------------------------


def server_tls_options(certificates_directory: PathLike,
                       certificate_name: str) -> CertificateOptions:
    """``ClusterTLS.server_options`` of ``<certificate_name>.crt/.key`` in the folder."""
    return ClusterTLS.load(certificates_directory, certificate_name).server_options()


def client_tls_options(certificates_directory: PathLike, certificate_name: str,
                       hostname: Optional[str] = None, *,
                       expected_identity: Optional[Identity] = None
                       ) -> IOpenSSLClientConnectionCreator:
    """
    ``ClusterTLS.client_options`` presenting ``<certificate_name>.crt/.key``. Give exactly
    one of ``hostname`` (the server is the control service reached by that name) or
    ``expected_identity`` (the server is that identity: a peer node).
    """
    if (hostname is None) == (expected_identity is None):
        raise ValueError("give exactly one of hostname and expected_identity")
    tls = ClusterTLS.load(certificates_directory, certificate_name)
    if hostname is not None:
        return tls.client_options(Identity.control(), hostname)
    return tls.client_options(expected_identity)


def client_tls_policy(certificates_directory: PathLike, certificate_name: str, *,
                      expected_identity: Optional[Identity] = None) -> ClusterTLSPolicy:
    """
    ``ClusterTLS.http_policy`` presenting ``<certificate_name>.crt/.key``: the server is
    the control service at the URL's host, or ``expected_identity``.
    """
    return ClusterTLS.load(certificates_directory, certificate_name).http_policy(
        expected_identity)


def treq_client(reactor, certificates_directory: PathLike, certificate_name: str, *,
                pool: Optional[HTTPConnectionPool] = None,
                expected_identity: Optional[Identity] = None) -> HTTPClient:
    """``ClusterTLS.treq_client`` presenting ``<certificate_name>.crt/.key``."""
    return ClusterTLS.load(certificates_directory, certificate_name).treq_client(
        reactor, pool=pool, expected=expected_identity)


@implementer(IStreamServerEndpoint)
@attr.s(frozen=True, auto_attribs=True)
class _TLSServerEndpoint:
    """A stream server endpoint that speaks TLS over a wrapped one."""

    _wrapped: IStreamServerEndpoint
    _options: object
    _clock: object
    _limits: ConnectionLimits = ConnectionLimits()
    _judge: Optional[Callable] = None

    def listen(self, protocolFactory):
        """Listen on the wrapped endpoint, every connection wrapped in TLS and guarded."""
        return self._wrapped.listen(guarded_tls_factory(
            self._options, protocolFactory, self._clock, self._limits, self._judge))


def _check_port_number(number: int, given) -> int:
    """``number`` if it is a TCP port number (0 picks a free one), else ValueError."""
    if not 0 <= number <= 65535:
        raise ValueError(f"invalid port {given!r}: a port number is 0 to 65535")
    return number


#: Connections the kernel queues for a listener before it accepts them (issue 12). Twisted's
#: 50 made a thousand agents connecting at once after a control restart lose a fifth of
#: their connections (each then silent until the agent gave up after 10 s, and retried
#: with backoff); the kernel caps it at net.core.somaxconn. An endpoint string may say
#: ``backlog=`` itself.
LISTEN_BACKLOG = 4096


def tcp_server_endpoint(reactor, port: Union[int, str]) -> IStreamServerEndpoint:
    """
    The plain TCP endpoint ``port`` names: a number (``4523``, ``"4523"``) listening on
    every interface, or a Twisted ``tcp:`` endpoint string
    (``"tcp:4523:interface=127.0.0.1"``); ``ValueError`` for anything else. Its backlog is
    ``LISTEN_BACKLOG`` unless the string gives one.
    """
    if isinstance(port, int) and not isinstance(port, bool):
        return TCP4ServerEndpoint(reactor, _check_port_number(port, port),
                                  backlog=LISTEN_BACKLOG)
    if not isinstance(port, str):
        raise ValueError(f"invalid port {port!r}: give a number or a tcp: endpoint")
    if port.isascii() and port.isdigit():
        return TCP4ServerEndpoint(reactor, _check_port_number(int(port), port),
                                  backlog=LISTEN_BACKLOG)
    if not port.startswith("tcp:"):
        raise ValueError(
            f"invalid port {port!r}: give a port number (4523) or a tcp: endpoint "
            "(tcp:4523:interface=127.0.0.1); TLS is always on, so ssl: and other "
            "endpoint types are not accepted")
    described = port if "backlog=" in port else f"{port}:backlog={LISTEN_BACKLOG}"
    try:
        endpoint = serverFromString(reactor, described)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"invalid port {port!r}: {e}") from None
    number = getattr(endpoint, "_port", None)
    if isinstance(number, int):
        _check_port_number(number, port)
    return endpoint


def tls_server_endpoint(reactor, port: Union[int, str], options,
                        limits: ConnectionLimits = ConnectionLimits(),
                        judge: Optional[Callable] = None) -> IStreamServerEndpoint:
    """
    A server endpoint on ``port`` (see ``tcp_server_endpoint``) where every connection
    speaks TLS with ``options`` (from ``server_tls_options``), guarded by ``limits``
    (``pyflock.common._connections``); with ``judge``, peers are re-judged periodically.
    """
    return _TLSServerEndpoint(tcp_server_endpoint(reactor, port), options, reactor, limits,
                              judge)


def tls_client_endpoint(reactor, host: str, port: int,
                        options: IOpenSSLClientConnectionCreator) -> IStreamClientEndpoint:
    """A client endpoint to ``host:port`` speaking TLS with ``options``."""
    return wrapClientTLS(options, HostnameEndpoint(reactor, host, port))


__all__ = [
    "AGENT_CHANNEL", "Admission", "ClusterTLS", "ClusterTLSPolicy", "ConnectionIdentities",
    "Identity", "JoinPolicy", "Listener", "MINIMUM_TLS_VERSION", "PEER_TRANSFER", "PeerCheck", "PeerRefused", "REST_API",
    "Role", "TLS12_CIPHERS", "client_tls_options", "never_revoked", "tls_options",
    "client_tls_policy", "identity_of_certificate", "peer_identity", "read_cluster_uuid",
    "server_tls_options", "tcp_server_endpoint", "tls_client_endpoint", "LISTEN_BACKLOG",
    "tls_server_endpoint", "treq_client",
]
