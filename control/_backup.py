"""
``pyflock-control backup --out FILE`` and ``pyflock-control restore FILE``: one file format
for both stores (docs/operations.md, docs/ha.md).

A backup is a JSON object: ``format`` (``pyflock-control-backup``), ``version``
(``BACKUP_VERSION``), where it was taken from and that store's schema version, and what
the store holds durably: the generation, every dataset (deleted ones whose data is kept
included), every lease, every join token (their hashes, never a secret) and, on etcd, the
shared revocation list. Restoring loads it into an empty store of either kind; it refuses
a store that holds anything. A restored store has a store id of its own, so no
configuration tag handed out before matches it.

The pure part (``Backup``, ``backup_to_json``, ``backup_from_json``) does no IO; the
shell reads and fills stores and writes and reads files.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from typing import Any, Optional

import attr

from pyflock.common._files import fsync_path, write_atomically
from pyflock.common._jsonread import (
    Malformed, as_object, read, read_list, read_natural, read_number, read_uuid,
)
from pyflock.common._model import Configuration, Lease
from pyflock.common._records import dataset_from_json, dataset_to_json
from pyflock.control._crl_sync import read_shared_crl, write_shared_crl
from pyflock.control._etcd_client import EtcdError, EtcdGateway, EtcdUnavailable
from pyflock.control._etcd_model import (
    MAX_TXN_OPS, SCHEMA_VERSION as ETCD_SCHEMA, Keys, range_request,
)
from pyflock.control._sqlite_store import (
    SCHEMA_VERSION as SQLITE_SCHEMA, backup as copy_sqlite, open_sqlite_store, store_path,
)
from pyflock.control._stores import (
    add_store_choice, etcd_options, open_store, store_description,
)
from pyflock.control._store import StoreError, StoreWrite
from pyflock.control._tokens import TokenRecord

#: What a backup file says it is.
BACKUP_FORMAT = "pyflock-control-backup"

#: The version of the backup file format this code writes and reads.
BACKUP_VERSION = 1

#: Datasets per write when filling a store: a dataset row and a lease row each, within
#: one etcd transaction.
DATASETS_PER_WRITE = (MAX_TXN_OPS - 2) // 2


class BackupFileError(Exception):
    """A backup file cannot be read or written; the message names it and says why."""


@attr.s(frozen=True, auto_attribs=True)
class Backup:
    """What a store holds durably, and where it came from (``source``, ``schema``)."""

    configuration: Configuration
    tokens: tuple[TokenRecord, ...] = ()
    crl: Optional[bytes] = None
    source: str = ""
    schema: int = 0


# -- the pure part --------------------------------------------------------------------------

def _lease_json(lease: Lease) -> dict:
    return {"dataset_id": lease.dataset_id, "node_uuid": lease.node_uuid,
            "expiration": lease.expiration}


def backup_to_json(backup: Backup, taken: str) -> dict:
    """The JSON object of ``backup``, taken at ``taken`` (an ISO 8601 time)."""
    config = backup.configuration
    return {
        "format": BACKUP_FORMAT, "version": BACKUP_VERSION, "taken": taken,
        "source": backup.source, "schema": backup.schema,
        "generation": config.generation,
        "datasets": [dataset_to_json(config.datasets[i]) for i in sorted(config.datasets)],
        "leases": [_lease_json(config.leases[i]) for i in sorted(config.leases)],
        "tokens": [attr.asdict(t) for t in sorted(backup.tokens, key=lambda t: t.token_id)],
        "crl": None if backup.crl is None else base64.b64encode(backup.crl).decode("ascii"),
    }


def _token(obj: Any, where: str) -> TokenRecord:
    obj = as_object(obj, where)
    return TokenRecord(token_id=read(obj, "token_id", (str,), where),
                       secret_hash=read(obj, "secret_hash", (str,), where),
                       created=read_number(obj, "created", where),
                       expires=read_number(obj, "expires", where),
                       uses=read_natural(obj, "uses", where),
                       used=read_natural(obj, "used", where))


def _lease(obj: Any, where: str) -> Lease:
    obj = as_object(obj, where)
    return Lease(dataset_id=read_uuid(obj, "dataset_id", where),
                 node_uuid=read_uuid(obj, "node_uuid", where),
                 expiration=read_number(obj, "expiration", where, optional=True))


def _crl(obj: dict) -> Optional[bytes]:
    text = obj.get("crl")
    if text is None:
        return None
    if not isinstance(text, str):
        raise Malformed("backup.crl must be base64 text or null")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed("backup.crl is not valid base64") from None


def backup_from_json(value: Any) -> Backup:
    """The backup a JSON value holds; ``Malformed`` saying what is wrong."""
    obj = as_object(value, "backup")
    if obj.get("format") != BACKUP_FORMAT:
        raise Malformed(f"it is not a pyflock-control backup (no \"format\": "
                        f"\"{BACKUP_FORMAT}\")")
    version = read_natural(obj, "version", "backup")
    if version > BACKUP_VERSION:
        raise Malformed(f"it is a backup of format version {version}, but this "
                        f"pyflock-control reads versions up to {BACKUP_VERSION}; restore "
                        f"it with a pyflock-control at least as new as the one that took it")
    datasets = [dataset_from_json(d, f"backup.datasets[{i}]")
                for i, d in enumerate(read_list(obj, "datasets", "backup"))]
    leases = [_lease(x, f"backup.leases[{i}]")
              for i, x in enumerate(read_list(obj, "leases", "backup"))]
    tokens = tuple(_token(x, f"backup.tokens[{i}]")
                   for i, x in enumerate(read_list(obj, "tokens", "backup", default=[])))
    ids = [d.dataset_id for d in datasets]
    if len(set(ids)) != len(ids):
        raise Malformed("backup.datasets names one dataset twice")
    live = [d.name for d in datasets if not d.deleted and d.name is not None]
    if len(set(live)) != len(live):
        raise Malformed("backup.datasets gives one name to two live datasets")
    live_ids = {d.dataset_id for d in datasets if not d.deleted}
    for lease in leases:
        if lease.dataset_id not in live_ids:
            raise Malformed(f"backup.leases has a lease on {lease.dataset_id}, which is "
                            f"not a live dataset of the backup")
    config = Configuration.from_records(datasets, leases,
                                        read_natural(obj, "generation", "backup"))
    return Backup(configuration=config, tokens=tokens, crl=_crl(obj),
                  source=str(obj.get("source", "")), schema=int(obj.get("schema") or 0))


def fill_writes(config: Configuration) -> list[StoreWrite]:
    """The writes that store ``config`` in an empty store, each within one transaction."""
    ids = sorted(set(config.datasets) | set(config.leases))
    writes = [StoreWrite.of(config, ids[i:i + DATASETS_PER_WRITE])
              for i in range(0, len(ids), DATASETS_PER_WRITE)]
    return writes or [StoreWrite(generation=config.generation)]


def summary(backup: Backup) -> str:
    """What a backup holds, in a few words."""
    config = backup.configuration
    return (f"{len(config.datasets)} datasets, {len(config.leases)} leases and "
            f"{len(backup.tokens)} join tokens")


# -- stores ---------------------------------------------------------------------------------

def _is_etcd(store: Any) -> bool:
    return hasattr(store, "gateway")


async def read_store(store: Any, source: str) -> Backup:
    """Everything ``store`` holds durably, as a ``Backup`` from ``source``."""
    snapshot = await store.load()
    tokens = await store.load_tokens()
    crl = await read_shared_crl(store.gateway, store.keys) if _is_etcd(store) else None
    return Backup(configuration=snapshot.configuration, tokens=tuple(tokens), crl=crl,
                  source=source, schema=ETCD_SCHEMA if _is_etcd(store) else SQLITE_SCHEMA)


async def restore_into(store: Any, backup: Backup, where: str) -> None:
    """
    Fill the empty ``store`` (at ``where``) with ``backup`` and check it by reading it
    back; ``StoreError`` if it is not empty (then nothing is written) or the copy differs.
    """
    there = await store.load()
    crl_there = await read_shared_crl(store.gateway, store.keys) if _is_etcd(store) else None
    if there.revision or there.configuration != Configuration() or crl_there or (
            await store.load_tokens()):
        raise StoreError(f"{where} already holds a configuration, join tokens or a "
                         f"revocation list; restore only into an empty store (a new "
                         f"--data-path, another --etcd-prefix, or delete this one with "
                         f"etcdctl del --prefix if it is not in use). Nothing was written.")
    config = backup.configuration
    for write in fill_writes(config):
        await store.write(write)
    for token in backup.tokens:
        await store.write_token(token.token_id, token)
    if backup.crl is not None and _is_etcd(store):
        await write_shared_crl(store.gateway, store.keys, backup.crl)
    copied = await store.load()
    if copied.configuration != config or len(await store.load_tokens()) != len(
            backup.tokens):
        raise StoreError(f"{where}: the copy read back differs from the backup; do not use "
                         f"it. Empty the store and restore again.")


# -- files ----------------------------------------------------------------------------------

def write_backup_file(path: str, document: dict) -> None:
    """Write ``document`` to the new file ``path`` (mode 0600, synced; never overwrites)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.lexists(path):
        raise BackupFileError(f"{path} already exists; a backup never overwrites a file. "
                              f"Choose a new file name.")
    if not os.path.isdir(folder):
        raise BackupFileError(f"{path}: the folder {folder} does not exist. Create it or "
                              f"choose another file.")
    data = json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False).encode()
    scratch = os.path.join(folder, f".{os.path.basename(path)}.partial")
    try:
        write_atomically(scratch, data + b"\n")
        try:
            os.link(scratch, path)
        finally:
            os.unlink(scratch)
        fsync_path(folder, directory=True)
    except FileExistsError:
        raise BackupFileError(f"{path} already exists; a backup never overwrites a file. "
                              f"Choose a new file name.") from None
    except OSError as e:
        raise BackupFileError(f"{path}: cannot write the backup ({e.strerror}).") from e


def read_backup_file(path: str) -> Backup:
    """The backup in the file ``path``; ``BackupFileError`` saying what is wrong."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except OSError as e:
        raise BackupFileError(f"{path}: cannot read it ({e.strerror}).") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise BackupFileError(f"{path} is not a pyflock-control backup: it is not JSON "
                              f"({e}).") from e
    try:
        return backup_from_json(value)
    except (Malformed, ValueError, TypeError) as e:
        raise BackupFileError(f"{path} cannot be restored: {e}. Nothing was written.") from e


# -- the commands ---------------------------------------------------------------------------

def add_backup_parsers(subparsers: Any, default_data_path: str) -> None:
    """The ``backup`` and ``restore`` commands' parsers."""
    backup = subparsers.add_parser(
        "backup", help="write a backup of the store (either kind) while the service runs")
    backup.add_argument("--out", metavar="FILE", default=None,
                        help="the new backup file (never overwritten), in the one JSON "
                             "format `pyflock-control restore` reads")
    backup.add_argument("file", nargs="?", default=None,
                        help="SQLite only, the older form: copy the SQLite file itself "
                             "to this new file")
    restore = subparsers.add_parser(
        "restore", help="load a backup written by `backup --out` into an empty store")
    restore.add_argument("file", metavar="FILE",
                         help="a backup written by `pyflock-control backup --out`")
    for parser in (backup, restore):
        parser.add_argument("--data-path", default=default_data_path,
                            help=f"the SQLite store's folder (default {default_data_path})")
        add_store_choice(parser)


async def _open(reactor: Any, options: argparse.Namespace) -> tuple[Any, str]:
    """The store the options name, open, and a description of it."""
    return await open_store(reactor, options), store_description(options)


async def _check_etcd_store(reactor: Any, options: argparse.Namespace) -> None:
    """``StoreError`` unless the etcd prefix holds a store (so that a mistyped prefix is
    not made into an empty store and backed up)."""
    endpoints, tls = etcd_options(options)
    gateway = EtcdGateway(reactor, endpoints, tls)
    key = Keys.under(options.etcd_prefix).store_id
    try:
        answer = await gateway.call("kv/range", range_request(key))
    except (EtcdError, EtcdUnavailable) as e:
        raise StoreError(f"etcd at {', '.join(endpoints)}: cannot read {key.decode()!r}: "
                         f"{e}") from e
    finally:
        await gateway.close()
    if not answer.get("kvs"):
        raise StoreError(f"there is no pyflock store under the etcd prefix "
                         f"{options.etcd_prefix!r} at {', '.join(endpoints)} (no "
                         f"{key.decode()!r}). Check --etcd-prefix and --etcd-endpoints.")


async def _sqlite_snapshot(reactor: Any, data_path: str) -> Backup:
    """A consistent online read of the SQLite store: a copy is taken, then read."""
    with tempfile.TemporaryDirectory(prefix=".pyflock-backup-",
                                     dir=os.path.dirname(os.path.abspath(data_path))) as tmp:
        copy_sqlite(data_path, store_path(tmp))
        store = await open_sqlite_store(reactor, tmp)
        try:
            return await read_store(store, f"sqlite {os.path.abspath(data_path)}")
        finally:
            await store.close()


async def take_backup(reactor: Any, options: argparse.Namespace, taken: str) -> str:
    """Write the backup ``options`` ask for; a summary, or ``StoreError``/``BackupFileError``."""
    if os.path.lexists(options.out):
        raise BackupFileError(f"{options.out} already exists; a backup never overwrites a "
                              f"file. Choose a new file name.")
    if getattr(options, "store", "sqlite") == "etcd":
        await _check_etcd_store(reactor, options)
        store, where = await _open(reactor, options)
        try:
            backup = await read_store(store, where)
        finally:
            await store.close()
    else:
        backup = await _sqlite_snapshot(reactor, options.data_path)
    write_backup_file(options.out, backup_to_json(backup, taken))
    return f"backed up {summary(backup)} from {backup.source} to {options.out}"


async def restore(reactor: Any, options: argparse.Namespace) -> str:
    """Load the backup file into the empty store ``options`` name; a summary."""
    backup = read_backup_file(options.file)
    store, where = await _open(reactor, options)
    try:
        await restore_into(store, backup, where)
    finally:
        await store.close()
    note = ""
    if backup.crl is not None and getattr(options, "store", "sqlite") != "etcd":
        note = ("; the backup's revocation list is not kept in an SQLite store: write it "
                "with `pyflock-ca crl` into cluster.crl beside cluster.crt")
    return f"restored {summary(backup)} from {options.file} into {where}{note}"


def run_command(name: str, work: Any) -> None:
    """Run ``work(reactor)`` on a reactor of its own; exit 1 with the reason on failure."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    def run(reactor):
        def failed(failure):
            failure.trap(StoreError, BackupFileError)
            print(f"pyflock-control {name}: {failure.value}", file=sys.stderr)
            raise SystemExit(1)
        return Deferred.fromCoroutine(work(reactor)).addCallbacks(print, failed)
    react(run)


def backup_main(options: argparse.Namespace) -> None:
    """``backup --out FILE`` or ``restore FILE``; exits 1 with the reason on failure."""
    if options.command == "restore":
        return run_command("restore", lambda reactor: restore(reactor, options))
    if not options.out or options.file:
        print("pyflock-control backup: give the new backup file with --out FILE (a FILE "
              "without --out copies an SQLite store's file; not both)", file=sys.stderr)
        raise SystemExit(2)
    taken = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run_command("backup", lambda reactor: take_backup(reactor, options, taken))


__all__ = ["BACKUP_FORMAT", "BACKUP_VERSION", "Backup", "BackupFileError", "backup_from_json",
           "add_backup_parsers", "backup_main", "backup_to_json", "fill_writes", "read_backup_file", "read_store", "restore",
           "restore_into", "take_backup", "write_backup_file"]
