"""
Contract suites: one per IO interface, written once and run against the in-memory double
and every real implementation (``store``: ``IConfigurationStore``; ``backends``:
``IBlockDeviceBackend``; ``peer_backends``: ``IPeerBackend``).
"""
