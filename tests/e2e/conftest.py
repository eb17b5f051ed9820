"""
Fixtures of the end-to-end tests: a whole pyflock cluster on real dockerd
(``PyflockDockerCluster`` of ``tests.harness.docker_cluster``), shared by a module.

End-to-end tests never pass silently on a machine that cannot run them: without root,
dockerd or busybox-static, a test using the ``pyflock`` fixture fails, saying what is
missing, when ``$CI`` is set, and is skipped with the same explanation otherwise
(``require_e2e``).
"""

from __future__ import annotations

import pytest

from tests.harness.docker_cluster import AGENT, PyflockDockerCluster
from tests.harness.dockerd import require_e2e, short_workdir


@pytest.fixture(scope="module")
def pyflock():
    """A control service and nodes n1 and n2 with agents and dockerd, for one module."""
    require_e2e()
    # The folder is removed afterwards unless $PYFLOCK_E2E_KEEP is set (never through
    # a mount point that cleanup failed to remove).
    with short_workdir() as workdir:
        cluster = PyflockDockerCluster(workdir)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def nodes(pyflock):
    """n1 and n2; after the test, every container on them is removed (even on failure),
    so one test's containers never hold another test's volumes."""
    yield pyflock["n1"], pyflock["n2"]
    for node in pyflock.nodes:
        if node.dockerd_running():
            node.remove_all_containers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of each node's agent and dockerd
    logs and of the control service's log (the cluster's folder goes after the module)."""
    outcome = yield
    report = outcome.get_result()
    cluster = item.funcargs.get("pyflock") if hasattr(item, "funcargs") else None
    if report.when != "call" or not report.failed or cluster is None:
        return
    for node in cluster.nodes:
        for log in (AGENT, "dockerd"):
            report.sections.append((f"{node.name} {log} log (end)", node.log_tail(log, 25)))
    if cluster.control is not None:
        lines = cluster.control.log_path.read_text(errors="replace").splitlines()[-25:] \
            if cluster.control.log_path.exists() else []
        report.sections.append(("control service log (end)", "\n".join(lines)))
