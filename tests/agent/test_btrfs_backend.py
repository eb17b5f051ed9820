"""
The ``btrfs`` backend on real loop-file pools: the ``IPeerBackend`` contract suite, and
what only btrfs does (pools, frozen subvolumes, checked receives, a full pool).
"""

import pytest

from tests.contracts.peer_backends import make_ipeerbackend_tests
from tests.harness.btrfs_pools import btrfs_peer_harness
from tests.harness.requirements import ROOT

pytestmark = [pytest.mark.integration, ROOT]


class BtrfsBackendConformanceTests(make_ipeerbackend_tests(btrfs_peer_harness)):
    """``BtrfsBackend`` honours ``IPeerBackend`` on real btrfs pools."""
