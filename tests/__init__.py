"""pyflock's test suite; ``tests.harness`` and ``tests.contracts`` are importable by ``bench/`` too."""
