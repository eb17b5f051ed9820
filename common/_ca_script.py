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
                    "address that nodes and users connect to. Install the files as "
                    "control-service.crt and control-service.key.")
    command.add_argument("hostname", metavar="HOSTNAME",
                         help="DNS name or IP address of the control service")
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
              "the control service as control-service.crt and control-service.key.")
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
