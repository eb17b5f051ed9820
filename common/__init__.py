"""
Shared pieces of pyflock: the configuration model, wire encoding, TLS and certificates,
the control service client, sizes and logging. Used by the control service, the agent and
the command-line tools alike.
"""

from pyflock.common._model import (
    MINIMUM_SIZE, Configuration, ConfigurationError, Dataset, DatasetDeleted,
    DatasetIdTaken, DatasetNotFound, Lease, LeaseHeld, LeaseNotFound, Leases, NameTaken,
)
from pyflock.common._ca import CertificateError, read_cluster_uuid
from pyflock.common._tls import (
    Identity, client_tls_policy, peer_identity, server_tls_options, tls_client_endpoint,
    tls_server_endpoint, treq_client,
)

__all__ = [
    "CertificateError", "Identity", "client_tls_policy", "peer_identity", "read_cluster_uuid",
    "server_tls_options", "tls_client_endpoint", "tls_server_endpoint", "treq_client",
    "MINIMUM_SIZE", "Configuration", "ConfigurationError", "Dataset", "DatasetDeleted",
    "DatasetIdTaken", "DatasetNotFound", "Lease", "LeaseHeld", "LeaseNotFound", "Leases",
    "NameTaken",
]
