"""
``pyflock-agent join``: a new host joins the cluster with a join token, making its own key.

1. The token is parsed and the certificates folder checked (no ``node.crt`` or
   ``node.key`` yet) before anything is sent.
2. ``GET /v1/join/authority`` on the join port, over TLS that trusts nothing yet: the CA
   certificate it answers is accepted only if its public key has the token's pin.
3. ``POST /v1/join`` with the token and a certificate signing request, over TLS that
   trusts only that CA and the control service's certificate for the host name given.
4. The answer's certificate must be a node certificate of that CA for this host's key.
   Only then are ``node.key`` (0600), ``node.crt`` and ``cluster.crt`` written, into the
   certificates folder (made 0700 if missing). A refused join writes nothing.

The private key never leaves the host: only the request, which carries the public key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.web.client import Agent

from pyflock.common._ca import (
    AUTHORITY_CERTIFICATE, CertificateError, cluster_uuid_of, common_name_of, write_new_file,
    write_pair,
)
from pyflock.common._client import describe_failure
from pyflock.common._tls import Identity, JoinPolicy
from pyflock.common._tokens import (
    DEFAULT_JOIN_PORT, InvalidToken, JoinToken, authority_pin, parse_token,
)

#: Seconds each request of the join may take.
JOIN_TIMEOUT = 30.0


class JoinError(Exception):
    """The join failed; ``str()`` is the one line that says why (nothing was written)."""


@attr.s(frozen=True, auto_attribs=True)
class Joined:
    """What a successful join wrote: the node's uuid, the cluster's, and the folder."""

    node_uuid: str
    cluster_uuid: str
    folder: Path


def parse_join_address(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[v6]:PORT`` for IPv6) as (host, port); ``JoinError`` if malformed."""
    host, port = text, DEFAULT_JOIN_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise JoinError(f"{text!r} is not HOST[:PORT]")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        port = int(port)
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise JoinError(f"{text!r} is not HOST[:PORT] with a port from 1 to 65535")
    return host, port


def check_folder(folder: Path) -> None:
    """Refuse to join into a folder that already holds a node's certificate or key."""
    if folder.exists() and not folder.is_dir():
        raise JoinError(f"{folder} is not a folder (agent.yml's certificates)")
    for name in ("node.crt", "node.key"):
        if os.path.lexists(folder / name):
            raise JoinError(f"{folder / name} already exists: this host has joined "
                            f"already; move node.crt and node.key aside to join anew")


def signing_request() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A new P-256 key and the PEM request for it (its subject is ignored by the CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                           "pyflock-join")]))
               .sign(key, hashes.SHA256()))
    return key, request.public_bytes(serialization.Encoding.PEM).decode("ascii")


def check_authority(pem: bytes, token: JoinToken, where: str) -> x509.Certificate:
    """The CA certificate ``pem`` if it has the token's pin, else ``JoinError``."""
    try:
        authority = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise JoinError(f"{where} answered no CA certificate: is it a pyflock control "
                        f"service's join port?") from None
    pin = authority_pin(authority)
    if pin != token.pin:
        raise JoinError(f"the control service at {where} is not the one this token is for: "
                        f"its CA's pin is {pin}, the token's is {token.pin}; nothing was "
                        f"sent")
    if cluster_uuid_of(authority) is None:
        raise JoinError(f"the CA certificate of {where} has no cluster uuid")
    return authority


def check_certificate(pem: str, authority: x509.Certificate,
                      key: ec.EllipticCurvePrivateKey) -> tuple[x509.Certificate, str]:
    """The issued certificate and its node uuid, if it is this key's node certificate."""
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
        certificate.verify_directly_issued_by(authority)
    except Exception:
        raise JoinError("the control service answered a certificate its CA did not "
                        "issue") from None
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    if (certificate.public_key().public_bytes(serialization.Encoding.DER, der)
            != key.public_key().public_bytes(serialization.Encoding.DER, der)):
        raise JoinError("the control service answered a certificate for another key")
    identity = Identity.from_common_name(common_name_of(certificate) or "")
    if (identity is None or identity.kind != "node"
            or cluster_uuid_of(certificate) != cluster_uuid_of(authority)):
        raise JoinError("the control service answered a certificate that is not a node "
                        "certificate of its cluster")
    return certificate, identity.node_uuid


def install(folder: Path, key, certificate: x509.Certificate,
            authority: x509.Certificate) -> None:
    """Write ``cluster.crt`` (unless it is there already), ``node.crt`` and ``node.key``."""
    authority_pem = authority.public_bytes(serialization.Encoding.PEM)
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        folder.chmod(0o700)
    existing = folder / AUTHORITY_CERTIFICATE
    fresh = not existing.exists()
    if not fresh and existing.read_bytes() != authority_pem:
        raise JoinError(f"{existing} is another cluster's CA certificate; move it aside")
    write_pair(folder, "node", certificate, key)
    if fresh:
        try:
            write_new_file(existing, authority_pem, 0o644)
        except BaseException:
            for name in ("node.crt", "node.key"):
                (folder / name).unlink()
            raise


async def _answer(response) -> dict:
    """The JSON body of a join answer, or ``JoinError`` with its description."""
    body = await response.content()
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if response.code == 200 and isinstance(value, dict):
        return value
    if isinstance(value, dict) and isinstance(value.get("description"), str):
        raise JoinError(f"the control service refused the join: {value['description']}")
    raise JoinError(f"the control service answered HTTP {response.code} without a reason")


async def join(reactor, control: str, token_text: str, folder: Path,
               http: Optional[HTTPClient] = None) -> Joined:
    """
    Join the cluster whose control service's join port is ``control`` (``HOST[:PORT]``)
    with ``token_text``, writing the node's files into ``folder``; ``JoinError`` if not.
    ``http`` is for tests (else one client per step, with the step's TLS policy).
    """
    try:
        token = parse_token(token_text)
    except InvalidToken as e:
        raise JoinError(str(e)) from None
    host, port = parse_join_address(control)
    check_folder(folder)
    url_host = f"[{host}]" if ":" in host else host
    base = f"https://{url_host}:{port}/v1/join"
    where = f"{host}:{port}"

    def client(authority=None) -> HTTPClient:
        return http or HTTPClient(Agent(reactor, contextFactory=JoinPolicy(authority)))

    try:
        response = await client().get(f"{base}/authority", timeout=JOIN_TIMEOUT)
        if response.code != 200:
            raise JoinError(f"{where} answered HTTP {response.code} for the CA "
                            f"certificate: is it a pyflock control service's join port?")
        authority = check_authority(await response.content(), token, where)
        key, request = signing_request()
        response = await client(authority).post(
            base, json.dumps({"token": str(token), "csr": request}).encode("utf-8"),
            headers={b"content-type": [b"application/json"]}, timeout=JOIN_TIMEOUT)
        answer = await _answer(response)
    except JoinError:
        raise
    except Exception as e:
        reason = describe_failure(e, host)
        raise JoinError(f"cannot join through {where}: {reason}") from None
    certificate, node_uuid = check_certificate(str(answer.get("certificate")), authority,
                                               key)
    try:
        install(folder, key, certificate, authority)
    except (CertificateError, OSError) as e:
        raise JoinError(f"cannot write the node's certificate: {e}") from None
    return Joined(node_uuid=node_uuid, cluster_uuid=cluster_uuid_of(authority) or "",
                  folder=folder)
