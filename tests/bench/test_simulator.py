"""
bench/simulator.py (issue 12): simulated agents are the real agent's channel and codec, and
a small fleet against a real control service converges to one view after changes.
"""

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path
from uuid import uuid4

import pytest
import pytest_twisted

import pyflock.agent._channel
import pyflock.common._wire
from pyflock.common._records import DatasetEntry
from pyflock.common._wire import MessageProtocol

_PATH = Path(__file__).resolve().parents[2] / "bench" / "simulator.py"


def _load_simulator():
    """bench/simulator.py as a module (bench/ is scripts, not a package)."""
    module = sys.modules.get("simulator")
    if module is None:
        spec = importlib.util.spec_from_file_location("simulator", _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["simulator"] = module
        spec.loader.exec_module(module)
    return module


def test_simulator_uses_the_real_agent_codec():
    """The simulator's agents are ``AgentChannel`` and its messages ``_wire``'s: it defines
    no protocol class or encoder of its own."""
    simulator = _load_simulator()
    assert simulator.AgentChannel is pyflock.agent._channel.AgentChannel
    assert simulator.Diff is pyflock.common._wire.Diff
    own = [obj for _, obj in inspect.getmembers(simulator, inspect.isclass)
           if obj.__module__ == "simulator"]
    assert not [c for c in own if issubclass(c, MessageProtocol)]
    assert not [name for name, obj in inspect.getmembers(simulator, inspect.isfunction)
                if obj.__module__ == "simulator" and name in ("encode", "decode")]


def test_replica_addresses_parsed():
    """``--control`` takes HOST:API_PORT:AGENT_PORT and says so when given anything else."""
    simulator = _load_simulator()
    assert simulator.Replica.parse("127.0.0.1:4523:4524") == simulator.Replica(
        "127.0.0.1", 4523, 4524)
    with pytest.raises(ValueError, match="HOST:API_PORT:AGENT_PORT"):
        simulator.Replica.parse("127.0.0.1:4523")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_small_fleet_converges(tmp_path):
    """20 simulated agents over real TLS with minted node certificates all get their
    snapshot from a real pyflock-control, see every dataset created through the REST API,
    and end on one view version."""
    from twisted.internet import reactor
    simulator = _load_simulator()
    options = argparse.Namespace(agents=20, datasets=50, changes=3, sync_timeout=30.0,
                                 heartbeat=1.0, control=None, certificates=None,
                                 restart=0, control_argument=None,
                                 workdir=str(tmp_path))
    result = await simulator.simulate(reactor, options)
    assert result["sync"]["all_synced"], result
    assert result["sync"]["synced_agents"] == 20
    assert result["change"]["changes_missed_by_some_agent"] == 0, result
    assert result["change"]["per_agent"]["count"] == 20 * 3
    assert result["views_per_replica"] == 1
    assert result["change"]["bytes_received_per_change"] > 0


def test_sharing_decodes_alike_frames_once_with_the_real_codec():
    """Within ``Sharing`` frames decode (with the real codec) to what they say, a snapshot
    page differing only in its version shares the decoded datasets, the same message on
    the same view builds one view; leaving restores the codec."""
    simulator = _load_simulator()
    wire = pyflock.common._wire
    real = wire.decode
    entry = DatasetEntry(str(uuid4()), str(uuid4()), 2 ** 30, {"name": "a"})
    pages = [wire.snapshot_pages(wire.Snapshot(epoch="e", version=v, datasets=(entry,)))
             for v in (3, 4)]
    with simulator.Sharing():
        first, second = (wire.decode(page, 3) for [page] in pages)
        assert (first.version, second.version) == (3, 4)
        assert first.datasets == second.datasets == (entry,)
        assert first.datasets is second.datasets
        assert wire.decode(pages[0][0], 3) == first
        view = simulator.SharedView()
        assert view.apply(first) is simulator.SharedView().apply(first)
        assert view.apply(second).current == wire.ViewVersion("e", 4)
    assert wire.decode is real
    assert wire.decode(pages[1][0], 3) == second


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_fleet_converges_after_a_control_restart(tmp_path):
    """200 simulated agents that had their view follow a real pyflock-control through a
    restart during which datasets were created in its store: every agent ends on one view
    version, which has the new datasets, having resumed from its version with diffs (no
    snapshot; a tenth of the bytes of the first sync at most)."""
    from twisted.internet import reactor
    simulator = _load_simulator()
    from _harness import make_certificates  # bench/, on the path with the simulator
    certificates = make_certificates(tmp_path).path
    nodes = simulator.mint_node_credentials(certificates, 200)
    held = simulator.plan_datasets([uuid for uuid, _ in nodes], 400)
    data_path = tmp_path / "control"
    await simulator.preload_store(reactor, data_path, held)
    control = simulator.ControlProcess(data_path, certificates, host="127.0.0.1",
                             log_directory=tmp_path)
    control.start()
    fleet = simulator.Fleet(reactor, nodes, [(control.host, control.agent_port)], 1.0)
    try:
        fleet.start(held)
        assert await simulator._with_timeout(reactor, fleet.all_synced, 60)
        assert await fleet.settled(30)
        [(_, before)] = fleet.views()
        first_sync = fleet.bytes_received() / len(fleet.agents)
        restart = await simulator.restart_control(reactor, fleet, control, data_path, 3, 60)
        assert restart["all_resumed"], restart
        [(_, version)] = fleet.views()
        # The view went on: same epoch, and every agent resumed with diffs.
        assert version.epoch == before.epoch and version.version > before.version
        assert restart["snapshots"] == 0, restart
        assert restart["bytes_received_per_agent"] < first_sync / 10, (restart, first_sync)
        assert fleet.agents[0].channel.view.current == version
    finally:
        await fleet.stop()
        control.stop()
