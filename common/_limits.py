"""
The limits every way into pyflock checks: the REST API's JSON schemas, the agent channel's
decoder and the values themselves read them from here, so the API and the wire cannot
disagree on what a dataset may be.
"""

#: Flocker's lower bound for ``maximum_size``: 64 MiB.
MINIMUM_SIZE = 64 * 1024 * 1024

#: The largest size a store can keep (a signed 64-bit integer, rounded to 1024).
MAXIMUM_BYTES = 2 ** 63 - 1024

#: A dataset's size is a whole number of KiB.
SIZE_MULTIPLE = 1024

#: The longest lease: ten years. Longer means "forever": say null.
MAXIMUM_LEASE = 10 * 365 * 24 * 3600

#: How many ``metadata`` pairs a dataset may have.
MAXIMUM_METADATA_ENTRIES = 16

#: The longest ``metadata`` key or value, in characters.
MAXIMUM_METADATA_TEXT = 256

#: The longest other text the agent channel takes (hosts, paths, eras, reasons).
MAXIMUM_TEXT = 1024

#: What an agent may report a dataset's state on its node to be, in the order of its life.
DATASET_STATES = ("creating", "attaching", "mounted", "moving", "deleting")

__all__ = [
    "DATASET_STATES", "MAXIMUM_BYTES", "MAXIMUM_LEASE", "MAXIMUM_METADATA_ENTRIES",
    "MAXIMUM_METADATA_TEXT", "MAXIMUM_TEXT", "MINIMUM_SIZE", "SIZE_MULTIPLE",
]
