"""
The ebs backend's ``wait_limits`` in agent.yml (for tests, shorter waits): read into
``WaitLimits``, the unnamed ones at their defaults; a bad one refused by name.
"""

import pytest

from pyflock.agent._backends._ebs import EBSOptions
from pyflock.agent._backends._ebs_model import WaitLimits
from pyflock.agent._config import ConfigError, parse_config

MINIMAL = {"version": 1, "control-service": {"hostname": "control.example"}}


def test_wait_limits_read_into_options():
    """``wait_limits`` sets the waits it names; the others keep their defaults."""
    config = parse_config({**MINIMAL, "dataset": {"backend": "ebs", "wait_limits": {
        "detached": 3, "interval": 0.2}}})
    options = EBSOptions.from_config(config.backend_options, config.default_size)
    assert options.limits == WaitLimits(detached=3, interval=0.2)
    assert options.limits.attached == WaitLimits().attached


def test_no_wait_limits_means_the_defaults():
    """Without ``wait_limits`` every wait has its default limit."""
    config = parse_config({**MINIMAL, "dataset": {"backend": "ebs"}})
    assert EBSOptions.from_config(config.backend_options, 1).limits == WaitLimits()


@pytest.mark.parametrize("limits, message", [
    ({"detached": 0}, "dataset.wait_limits.detached"),
    ({"detached": "soon"}, "dataset.wait_limits.detached"),
    ({"forever": 1}, "'forever' was unexpected"),
])
def test_bad_wait_limits_refused(limits, message):
    """A wait limit that is not a positive number, or not a wait, is refused by name."""
    with pytest.raises(ConfigError, match=message):
        parse_config({**MINIMAL, "dataset": {"backend": "ebs", "wait_limits": limits}})
