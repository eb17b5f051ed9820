"""
Process and host harnesses for tests and benchmarks, kept out of the installed runtime:
certificates (``certificates``), pyflock service processes (``processes``, ``control``,
``agents``), simulated Docker hosts (``dockerd``, ``docker_cluster``) and in-memory
filesystems (``memory``). ``bench/`` imports them too (the repository root is on its path).
"""
