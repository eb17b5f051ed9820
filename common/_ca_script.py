"""
``pyflock-ca``: create a cluster's certificate authority and issue its certificates.

Every command reads the CA from ``-i/--inputpath`` and writes into ``-o/--outputpath``,
both the current folder by default. Failures print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from pyflock.common._ca import (
    CertificateError, create_api_certificate, create_control_certificate,
    create_node_certificate, initialize,
)
from pyflock.common._crl import CRL_LIFETIME, list_revoked, resign_crl, revoke


def _add_paths(parser: argparse.ArgumentParser, reads_ca: bool = True) -> None:
    """Add the ``-i/--inputpath`` and ``-o/--outputpath`` options to ``parser``."""
    parser.add_argument(
        "-i", "--inputpath", default=".", metavar="FOLDER",
        help=("folder holding cluster.crt and cluster.key (default: the current folder)"
              if reads_ca else "not used by this command (it reads no CA)"))
    parser.add_argument(
        "-o", "--outputpath", default=".", metavar="FOLDER",
        help="folder to write the new files into (default: the current folder)")


def _parser() -> argparse.ArgumentParser:
    """The command-line parser of ``pyflock-ca``."""
    parser = argparse.ArgumentParser(
        prog="pyflock-ca",
        description="Create a pyflock cluster's certificate authority and issue the "
                    "certificates of its control service, nodes and API users.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    command = commands.add_parser(
        "initialize", help="create a new cluster CA: cluster.crt and cluster.key",
        description="Create a new certificate authority for a cluster: cluster.crt "
                    "(give it to every host and user) and cluster.key (keep it secret "
                    "and offline).")
    command.add_argument("name", metavar="NAME", help="the cluster's name")
    command.add_argument(
        "--cluster-uuid", metavar="UUID", default=None,
        help="use this cluster uuid instead of a new one (when replacing the CA of an "
             "existing cluster; see docs/security.md)")
    _add_paths(command, reads_ca=False)

    command = commands.add_parser(
        "create-control-certificate",
        help="issue the control service's certificate: control-HOSTNAME.crt/.key",
        description="Issue the control service's certificate for the host name or IP "
                    "address that nodes and users connect to; with several control "
                    "service replicas, give every name they are reached by (each "
                    "replica's, and a DNS name listing them all): one certificate names "
                    "them all and serves every replica, written as control-<first "
                    "HOSTNAME>.crt/.key. Install the files as control-service.crt and "
                    "control-service.key.")
    command.add_argument("hostname", metavar="HOSTNAME", nargs="+",
                         help="DNS name or IP address of the control service (or of each "
                              "replica)")
    _add_paths(command)

    command = commands.add_parser(
        "create-node-certificate", help="issue a node's certificate: <uuid>.crt/.key",
        description="Issue a certificate for a new node (a new node uuid, printed). "
                    "Install the files on the node as node.crt and node.key.")
    command.add_argument(
        "--uuid", metavar="UUID", default=None,
        help="issue for this existing node uuid instead of a new one (to replace a "
             "node's certificate while keeping its identity)")
    _add_paths(command)

    command = commands.add_parser(
        "create-api-certificate", help="issue an API user's certificate: USER.crt/.key",
        description="Issue a certificate with which USER may use the REST API.")
    command.add_argument("user", metavar="USER",
                         help="user name: letters, digits, '_', '.', '-'")
    _add_paths(command)

    command = commands.add_parser(
        "revoke", help="revoke a node's, a user's or one certificate: writes cluster.crl",
        description="Revoke every certificate the CA issued to a node or a user, or one "
                    "certificate file, then sign the revocation list cluster.crl anew into "
                    "the output folder (the control service's certificates folder, beside "
                    "cluster.crt). The control service applies it within seconds.")
    target = command.add_mutually_exclusive_group(required=True)
    target.add_argument("--node", metavar="UUID", help="revoke this node's certificates")
    target.add_argument("--user", metavar="NAME", help="revoke this user's certificates")
    target.add_argument("certificate", metavar="CERTFILE", nargs="?",
                        help="revoke the certificate in this file")
    _add_paths(command)

    command = commands.add_parser(
        "crl", help="sign cluster.crl anew (it is valid for "
                    f"{CRL_LIFETIME.days} days)",
        description=f"Sign the revocation list cluster.crl anew from the CA's index into "
                    f"the output folder. A list is valid for {CRL_LIFETIME.days} days: "
                    f"re-sign it before then (an expired list still counts, with a "
                    f"warning in the control service's log).")
    _add_paths(command)

    command = commands.add_parser(
        "list-revoked", help="show the certificates revoked",
        description="Show every certificate revoked, from the CA's index.")
    _add_paths(command)
    return parser


def _run(options: argparse.Namespace) -> None:
    """Carry out the parsed command, printing what was written."""
    if options.command == "initialize":
        files = initialize(options.outputpath, options.name,
                           cluster_uuid=options.cluster_uuid)
        print(f"Created {files.certificate_path} and {files.key_path} for cluster "
              f"{files.cluster_uuid}.")
        print(f"Keep {files.key_path.name} secret: whoever holds it controls the cluster.")
    elif options.command == "create-control-certificate":
        files = create_control_certificate(options.inputpath, options.outputpath,
                                           options.hostname)
        print(f"Created {files.certificate_path} and {files.key_path}. Install them on "
              "the control service (on every replica, if there are several) as "
              "control-service.crt and control-service.key.")
    elif options.command == "create-node-certificate":
        node_uuid = create_node_certificate(options.inputpath, options.outputpath,
                                            options.uuid)
        # Only the uuid goes to stdout, so that NODE=$(pyflock-ca ...) works in scripts.
        folder = Path(options.outputpath)
        print(f"Created {folder / node_uuid}.crt and {folder / node_uuid}.key. Install "
              "them on the node as node.crt and node.key.", file=sys.stderr)
        print(node_uuid)
    elif options.command == "create-api-certificate":
        files = create_api_certificate(options.inputpath, options.outputpath,
                                       options.user)
        print(f"Created {files.certificate_path} and {files.key_path} for user "
              f"{options.user}.")
    elif options.command == "revoke":
        _revoke(options)
    elif options.command == "crl":
        path, listed = resign_crl(options.inputpath, options.outputpath)
        print(f"Wrote {path}: {listed} certificate(s) revoked, valid for "
              f"{CRL_LIFETIME.days} days.")
    elif options.command == "list-revoked":
        _list_revoked(options.inputpath)


def _revoke(options: argparse.Namespace) -> None:
    """``pyflock-ca revoke``: revoke, then say what was revoked and where the list is."""
    done = revoke(options.inputpath, options.outputpath, node=options.node,
                  user=options.user, certificate_path=options.certificate)
    for entry in done.new:
        print(f"Revoked {entry.common_name} (serial {entry.serial:x}).")
    for entry in done.already:
        print(f"{entry.common_name} (serial {entry.serial:x}) was already revoked.")
    print(f"Wrote {done.crl_path}: {done.listed} certificate(s) revoked, valid for "
          f"{CRL_LIFETIME.days} days. Install it beside cluster.crt on the control service "
          f"if this is not its certificates folder.")


def _list_revoked(ca_path: str) -> None:
    """``pyflock-ca list-revoked``: one line per revocation, oldest first."""
    entries = list_revoked(ca_path)
    if not entries:
        print("No certificate is revoked.")
        return
    print(f"{'REVOKED AT':<21} {'SERIAL':<41} COMMON NAME")
    for entry in entries:
        name = (entry.common_name or "?").encode("unicode_escape").decode("ascii")
        print(f"{entry.revoked_at:%Y-%m-%dT%H:%M:%SZ}  {entry.serial:<41x} {name}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pyflock-ca`` with ``argv`` (default: the process's); return the exit status."""
    options = _parser().parse_args(argv)
    try:
        _run(options)
    except CertificateError as e:
        print(f"pyflock-ca: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyflock-ca: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
