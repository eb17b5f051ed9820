"""
The control service: the durable desired configuration (datasets, primaries, sizes,
metadata, leases) behind one store interface, the in-memory cluster state rebuilt from
agents and the REST API v1 (Flocker-compatible, mutual TLS).
"""

from pyflock.control._api import ControlAPI
from pyflock.control._backup import Backup, read_backup_file, read_store, restore_into
from pyflock.control._crl_sync import SharedRevocations
from pyflock.control._clusterstate import ClusterState, ClusterStateService, NodeState
from pyflock.control._persistence import ConfigurationService, StoreUnavailable
from pyflock.control._sqlite_store import SQLiteConfigurationStore, backup, open_sqlite_store
from pyflock.control._store import (
    HistoryGone, IConfigurationStore, MemoryConfigurationStore, StoreChanges, StoreError,
    StoreSnapshot, StoreWrite,
)

__all__ = [
    "Backup", "SharedRevocations", "read_backup_file", "read_store", "restore_into",
    "ClusterState", "ClusterStateService", "ConfigurationService", "ControlAPI",
    "HistoryGone", "IConfigurationStore", "MemoryConfigurationStore",
    "NodeState", "SQLiteConfigurationStore", "StoreChanges", "StoreError", "StoreSnapshot",
    "StoreUnavailable", "StoreWrite", "backup", "open_sqlite_store",
]
