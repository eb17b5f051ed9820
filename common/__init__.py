"""
Shared pieces of pyflock: the values of a dataset, its lease, a node's report of it and a
node, with their JSON codecs, the validation limits, the configuration model, wire encoding,
TLS and certificates, the control service client, sizes and logging. Used by the control
service, the agent and the command-line tools alike.
"""

from pyflock.common._model import (
    MINIMUM_SIZE, Configuration, ConfigurationError, Dataset, DatasetDeleted,
    DatasetIdTaken, DatasetNotFound, Lease, LeaseHeld, LeaseNotFound, Leases, NameTaken,
)
from pyflock.common._records import (
    DatasetEntry, DatasetReport, Malformed, Node, dataset_entry_from_json,
    dataset_entry_to_json, dataset_from_json, dataset_to_json, lease_from_json, lease_to_json,
    node_from_api_json, node_from_json, node_to_api_json, node_to_json, report_from_api_json,
    report_from_json, report_to_api_json, report_to_json, Transfer,
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
    "NameTaken", "DatasetEntry", "DatasetReport", "Malformed", "dataset_entry_from_json",
    "dataset_entry_to_json", "dataset_from_json", "dataset_to_json", "lease_from_json",
    "lease_to_json", "Node", "node_from_api_json", "node_from_json", "node_to_api_json",
    "node_to_json", "report_from_api_json", "report_from_json", "report_to_api_json",
    "report_to_json", "Transfer",
]
