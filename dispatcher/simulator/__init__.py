"""Fake HostUp v2 and NocWorx v1 servers that behave as documented, with knobs for every fault.

Used by the demo, acceptance and chaos tests and the benchmarks::

    with start_in_thread(SimulatorSettings(rate_limit=5)) as sim:
        ...  # targets at sim.hostup_url / sim.nocworx_url; sim.stats() counts tickets per marker
"""

from dispatcher.simulator.app import create_app
from dispatcher.simulator.runner import RunningSimulator, serve, start_in_thread
from dispatcher.simulator.settings import SettingsError, SimulatorSettings

__all__ = [
    "RunningSimulator",
    "SettingsError",
    "SimulatorSettings",
    "create_app",
    "serve",
    "start_in_thread",
]
