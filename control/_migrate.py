"""
``pyflock-control migrate --from-data-path DIR --etcd-endpoints URL[,URL...]``: copy the
SQLite store in ``DIR`` into an empty etcd prefix, so that a cluster can move onto etcd
(docs/ha.md). It refuses a prefix that holds a configuration or join tokens, takes the
SQLite store's lock (so pyflock-control must be stopped), and reads the copy back to check
it before saying it is done.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pyflock.common._model import Configuration
from pyflock.control._backup import fill_writes
from pyflock.control._etcd_store import open_etcd_store
from pyflock.control._sqlite_store import open_sqlite_store, store_path
from pyflock.control._store import StoreError
from pyflock.control._stores import add_etcd_arguments, etcd_options


def add_migrate_parser(subparsers: Any) -> None:
    """The ``migrate`` command's parser."""
    parser = subparsers.add_parser(
        "migrate", help="copy the SQLite store into an empty etcd prefix (stop "
                        "pyflock-control first)")
    parser.add_argument("--from-data-path", required=True, metavar="DIR",
                        help="the data path of the SQLite store to copy")
    add_etcd_arguments(parser)


async def migrate(reactor: Any, options: argparse.Namespace) -> str:
    """Copy the SQLite store into the etcd prefix; a summary, or ``StoreError``."""
    endpoints, tls = etcd_options(options)
    if not os.path.isfile(store_path(options.from_data_path)):
        raise StoreError(f"{store_path(options.from_data_path)}: there is no configuration "
                         f"store here. Check --from-data-path.")
    source = await open_sqlite_store(reactor, options.from_data_path)
    try:
        snapshot = await source.load()
        tokens = await source.load_tokens()
    finally:
        await source.close()
    config = snapshot.configuration
    target = await open_etcd_store(reactor, endpoints, options.etcd_prefix, tls)
    try:
        there = await target.load()
        if there.revision or there.configuration != Configuration() or (
                await target.load_tokens()):
            raise StoreError(f"{target.where} already holds a configuration or join "
                             f"tokens; migrate only into an empty prefix (choose another "
                             f"--etcd-prefix, or delete this one with etcdctl del --prefix "
                             f"if it is not in use). Nothing was written.")
        for write in fill_writes(config):
            await target.write(write)
        for token in tokens:
            await target.write_token(token.token_id, token)
        copied = await target.load()
        if copied.configuration != config or len(await target.load_tokens()) != len(tokens):
            raise StoreError(f"{target.where}: the copy read back differs from the SQLite "
                             f"store; do not use it. Delete the prefix and migrate again.")
    finally:
        await target.close()
    return (f"migrated {len(config.datasets)} datasets, {len(config.leases)} leases and "
            f"{len(tokens)} join tokens from {options.from_data_path} to {target.where}")


def migrate_main(options: argparse.Namespace) -> None:
    """Run ``migrate`` on a reactor of its own; exits 1 with the reason when it fails."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    def run(reactor):
        def failed(failure):
            failure.trap(StoreError)
            print(f"pyflock-control migrate: {failure.value}", file=sys.stderr)
            raise SystemExit(1)
        return Deferred.fromCoroutine(migrate(reactor, options)).addCallbacks(
            print, failed)
    react(run)
