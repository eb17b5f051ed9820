"""
The control service: the durable desired configuration (datasets, primaries, sizes,
metadata, leases) behind one store interface, the in-memory cluster state rebuilt from
agents, the REST API v1 (Flocker-compatible, mutual TLS) and the ``pyflock`` CLI.
"""

__all__: list[str] = []
