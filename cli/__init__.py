"""
The ``pyflock`` command line: a REST client of the control service. It imports nothing of
the server (``pyflock.control``): only ``pyflock.common``'s client, model and sizes, and
each command imports what it needs when it runs.
"""

__all__: list[str] = []
