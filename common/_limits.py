"""
The limits every way into pyflock checks: the REST API's JSON schemas, the agent channel's
decoder and the values themselves read them from here, so the API and the wire cannot
disagree on what a dataset may be.
"""

from typing import Optional

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

#: The most UTF-8 bytes of one ``metadata`` key or value (256 characters fit: issue 8).
MAXIMUM_METADATA_TEXT_BYTES = 1024

#: The most UTF-8 bytes of a dataset's ``metadata``, its keys and values together.
MAXIMUM_METADATA_BYTES = 8 * 1024

#: The longest other text the agent channel takes (hosts, paths, eras, reasons).
MAXIMUM_TEXT = 1024

#: The longest host name (RFC 1123).
MAXIMUM_HOST_NAME = 253

#: Agent channel frames from the control service longer than this are refused (a
#: version 2 snapshot is one frame; from version 3 on snapshots come in pages).
MAX_MESSAGE = 32 * 1024 * 1024

#: Agent channel frames from an agent longer than this are refused (a state report of
#: about 7,000 datasets fits; ``pyflock-control --agent-message-limit``).
AGENT_MESSAGE_LIMIT = 1024 * 1024

#: The control service sends snapshots in pages of about this many bytes (version 3).
SNAPSHOT_PAGE = 1024 * 1024

#: A connection whose peer lets more than this many bytes of sent messages wait is
#: dropped (``pyflock-control --agent-send-limit``).
SEND_LIMIT = 64 * 1024 * 1024

#: What an agent may report a dataset's state on its node to be, in the order of its life.
DATASET_STATES = ("creating", "attaching", "mounted", "moving", "deleting")



def utf8_length(text: str) -> int:
    """The bytes of ``text`` in UTF-8 (a lone surrogate counts as 3, as WTF-8 has it)."""
    return len(text.encode("utf-8", "surrogatepass"))


def metadata_problem(metadata: dict) -> Optional[str]:
    """
    What makes ``metadata`` (strings to strings, within Flocker's limits) too big in
    UTF-8 bytes, or None: a key or value over ``MAXIMUM_METADATA_TEXT_BYTES``, or all of
    them over ``MAXIMUM_METADATA_BYTES`` (pure).
    """
    total = 0
    for key, value in metadata.items():
        for text in (key, value):
            length = utf8_length(text)
            if length > MAXIMUM_METADATA_TEXT_BYTES:
                return (f"metadata keys and values must be at most "
                        f"{MAXIMUM_METADATA_TEXT_BYTES} bytes in UTF-8; {text[:40]!r}... is "
                        f"{length}")
            total += length
    if total > MAXIMUM_METADATA_BYTES:
        return (f"metadata must be at most {MAXIMUM_METADATA_BYTES} bytes in UTF-8, keys "
                f"and values together; this is {total}")
    return None


__all__ = [
    "AGENT_MESSAGE_LIMIT", "DATASET_STATES", "MAXIMUM_BYTES", "MAXIMUM_HOST_NAME",
    "MAXIMUM_LEASE", "MAXIMUM_METADATA_BYTES", "MAXIMUM_METADATA_ENTRIES",
    "MAXIMUM_METADATA_TEXT", "MAXIMUM_METADATA_TEXT_BYTES", "MAXIMUM_TEXT", "MAX_MESSAGE",
    "MINIMUM_SIZE", "SEND_LIMIT", "SIZE_MULTIPLE", "SNAPSHOT_PAGE", "metadata_problem",
    "utf8_length",
]
