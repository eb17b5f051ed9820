"""
Shared pieces of pyflock: the configuration model, wire encoding, TLS and certificates,
the control service client, sizes and logging. Used by the control service, the agent and
the command-line tools alike.
"""

from pyflock.common._model import (
    MINIMUM_SIZE, Configuration, ConfigurationError, Dataset, DatasetDeleted,
    DatasetIdTaken, DatasetNotFound, Lease, LeaseHeld, LeaseNotFound, Leases, NameTaken,
)

__all__ = [
    "MINIMUM_SIZE", "Configuration", "ConfigurationError", "Dataset", "DatasetDeleted",
    "DatasetIdTaken", "DatasetNotFound", "Lease", "LeaseHeld", "LeaseNotFound", "Leases",
    "NameTaken",
]
