"""Mock vLLM fleet: simulated model servers that batch, cache and queue like vLLM.

Programmatic use (tests, demo, benchmarks)::

    from epp.sim import SimConfig, SimFleet

    async with SimFleet(ports=[0, 0], config=SimConfig(time_scale=0.1)) as fleet:
        ...  # fleet.urls, fleet.servers[i].engine

Command line: ``epp sim --ports 8001,8002`` or ``python -m epp.sim --ports 8001,8002``.
See README.md in this package.
"""

from epp.sim.config import DEFAULT_MODEL, SimConfig
from epp.sim.fleet import SimFleet, SimServer, start_fleet
from epp.sim.kvevents import KVEventsConfig
from epp.sim.server import ADDRESS_HEADER, FORCE_ERROR_HEADER, SERVER_HEADER

__all__ = [
    "ADDRESS_HEADER",
    "DEFAULT_MODEL",
    "FORCE_ERROR_HEADER",
    "KVEventsConfig",
    "SERVER_HEADER",
    "SimConfig",
    "SimFleet",
    "SimServer",
    "start_fleet",
]
