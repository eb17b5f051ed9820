"""
The ``pyflock`` command line: a REST client of the control service. It imports nothing of
the server (``pyflock.control``). ``_cli`` (``run``, ``main``) and ``_parser`` use only the
standard library, so ``pyflock --help`` answers without loading Twisted; ``_settings``
(flags, environment, cli.yml), ``_output`` (naming and tables) and ``_commands`` (the
subcommands, on ``pyflock.common._client``) are imported when a command runs.
"""

__all__: list[str] = []
