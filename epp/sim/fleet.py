"""Start and stop simulated servers in the current event loop.

    async with SimFleet(ports=[0, 0, 0], config=SimConfig(time_scale=0.1)) as fleet:
        urls = fleet.urls            # ["http://127.0.0.1:41234", ...]
        fleet.servers[0].engine      # the engine, for white-box assertions

Each server is an independent engine (its own scheduler, KV cache and RNG
stream) with its own aiohttp site; all share the caller's event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import TracebackType

from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.engine import Engine
from epp.sim.server import SimApp


class SimServer:
    """One simulated model server: an engine and the HTTP site in front of it."""

    def __init__(self, config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.engine = Engine(config)
        self.http = SimApp(self.engine)
        self._runner: web.AppRunner | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # e.g. the port is taken: do not leak the engine task
            raise

    async def _start(self) -> None:
        self.engine.start()
        # handler_cancellation: a client that disconnects aborts its request,
        # freeing KV and its batch slot, as vLLM does.
        runner = web.AppRunner(self.http.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        # With port 0 the OS picked one: read it back from the bound socket.
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = address[1]
                break
        self.http.address = f"{self.host}:{self.port}"

    async def stop(self) -> None:
        self.http.close()
        await self.engine.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def fleet_configs(config: SimConfig, count: int, speeds: Sequence[float] | None = None) -> list[SimConfig]:
    """Per-server configs: names sim-0..N-1, distinct seeds, optional per-server speed."""
    if speeds is not None and len(speeds) not in (1, count):
        raise ValueError(f"got {len(speeds)} speed factors for {count} servers")
    out = []
    for i in range(count):
        speed = config.speed if speeds is None else speeds[0 if len(speeds) == 1 else i]
        out.append(dataclasses.replace(config, name=f"sim-{i}", seed=config.seed + i, speed=speed))
    return out


class SimFleet:
    """Several servers in one process; ``ports`` may contain 0 for a free port."""

    def __init__(
        self,
        ports: Sequence[int] = (0,),
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        speeds: Sequence[float] | None = None,
        configs: Sequence[SimConfig] | None = None,
    ) -> None:
        if configs is None:
            configs = fleet_configs(config or SimConfig(), len(ports), speeds)
        elif len(configs) != len(ports):
            raise ValueError("need one config per port")
        self.servers = [SimServer(cfg, host, port) for cfg, port in zip(configs, ports)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def by_name(self, name: str) -> SimServer:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(name)

    async def start(self) -> SimFleet:
        started: list[SimServer] = []
        try:
            for server in self.servers:
                await server.start()
                started.append(server)
        except BaseException:
            for server in started:
                await server.stop()
            raise
        return self

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()

    async def __aenter__(self) -> SimFleet:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def start_fleet(
    ports: Sequence[int] = (0,),
    config: SimConfig | None = None,
    *,
    host: str = "127.0.0.1",
    speeds: Sequence[float] | None = None,
) -> SimFleet:
    """Start a fleet and return it; call ``await fleet.stop()`` when done."""
    return await SimFleet(ports, config, host=host, speeds=speeds).start()
