"""
The usage text at the top of ``control/_script.py`` names every option of
``pyflock-control run``.
"""

import argparse

from pyflock.control import _script


def _run_options() -> set[str]:
    parser = _script._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for action in sub.choices["run"]._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"}


def test_usage_names_every_run_option():
    """Every long option ``run`` takes is in the module's usage text."""
    usage = _script.__doc__
    missing = sorted(flag for flag in _run_options() if f"[{flag}" not in usage
                     and f" {flag} " not in usage)
    assert missing == []
    assert "--state-lease-ttl" in _run_options()
