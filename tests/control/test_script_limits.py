"""
``pyflock-control``'s options for issue 8's limits: defaults, given values, and refusals.
"""

import pytest

from pyflock.common._connections import ConnectionLimits
from pyflock.control._ratelimit import NodeLimits, TokenBucketPolicy
from pyflock.control._script import _parser, connection_limits, node_limits


def test_defaults():
    """Without options: 1,000 connections, 10 s handshakes, re-checks every 60 s, a quota
    of 1,000 datasets and 20 writes a second in bursts of 100."""
    options = _parser().parse_args(["run"])
    assert connection_limits(options) == ConnectionLimits(1000, 10.0, 60.0)
    assert node_limits(options) == NodeLimits(1000, TokenBucketPolicy(20.0, 100))


def test_given():
    """Each option sets its limit."""
    options = _parser().parse_args([
        "--max-connections", "5", "--tls-handshake-timeout", "1.5", "--tls-recheck", "0.5",
        "--node-dataset-quota", "7", "--node-write-rate", "2.5", "--node-write-burst", "3"])
    assert connection_limits(options) == ConnectionLimits(5, 1.5, 0.5)
    assert node_limits(options) == NodeLimits(7, TokenBucketPolicy(2.5, 3))


@pytest.mark.parametrize("argv", [["--max-connections", "0"], ["--max-connections", "x"],
                                  ["--tls-handshake-timeout", "0"],
                                  ["--tls-recheck", "-1"], ["--node-dataset-quota", "1.5"],
                                  ["--node-write-rate", "inf"], ["--node-write-burst", "0"]])
def test_refused(argv, capsys):
    """A value that allows nothing, or is no number, is a usage error naming it."""
    with pytest.raises(SystemExit) as exit:
        _parser().parse_args(argv)
    assert exit.value.code == 2
    assert argv[1] in capsys.readouterr().err
