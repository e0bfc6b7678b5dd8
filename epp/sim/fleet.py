"""Start and stop simulated servers in the current event loop.

    async with SimFleet(ports=[0, 0, 0], config=SimConfig(time_scale=0.1)) as fleet:
        urls = fleet.urls            # ["http://127.0.0.1:41234", ...]
        fleet.servers[0].engine      # the engine, for white-box assertions

Each server is an independent engine (its own scheduler, KV cache and RNG
stream) with its own aiohttp site; all share the caller's event loop.

Servers may sit on distinct addresses (``hosts=["127.0.0.2", "127.0.0.3"]``,
all on one port) so a one-machine fleet looks like pods. With KV events on,
server i of those sharing one address is that address's data-parallel rank i:
its event and replay ports are offset by i, as vLLM offsets them per rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import TracebackType

from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.engine import Engine
from epp.sim.kvevents import Addresses, make_publisher
from epp.sim.server import SimApp


class SimServer:
    """One simulated model server: an engine, its KV-event publisher and the HTTP site in front.

    ``rank`` is the server's data-parallel rank on its address: it offsets the
    KV event and replay ports, and is the batches' ``data_parallel_rank``.
    """

    def __init__(self, config: SimConfig, host: str = "127.0.0.1", port: int = 0, *, rank: int = 0) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.rank = rank
        self._runner: web.AppRunner | None = None
        self._kv_addresses: Addresses | None = None
        self._fresh()

    def _fresh(self) -> None:
        """A new engine (empty cache, new hash root) and HTTP app: what a process start gives."""
        self.engine = Engine(self.config)
        self.http = SimApp(self.engine)

    @property
    def kv_events_endpoint(self) -> str | None:
        """Where the PUB socket is bound or connected (the real port if ``*`` was asked), once started."""
        return self.engine.publisher.endpoint

    @property
    def kv_replay_endpoint(self) -> str | None:
        return self.engine.publisher.replay_endpoint

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
        cfg = self.config
        # After the HTTP bind, so the topic can name the real port.
        publisher = make_publisher(
            cfg.kv_events, host=self.host, port=self.port, rank=self.rank, model=cfg.served_name,
            block_size=cfg.block_size, event_format=cfg.kv_events_format, addresses=self._kv_addresses)
        self._kv_addresses = publisher.addresses  # a restart reuses them, like the HTTP port
        self.engine.attach_publisher(publisher)
        self.engine.start()

    async def stop(self) -> None:
        self.http.close()
        await self.engine.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.engine.publisher.close()

    async def restart(self) -> None:
        """Stop, then start as a new process would on the same address and port.

        The KV cache starts empty, the event sequence from 0, and without a
        hash seed the block hashes change. ``engine`` and ``http`` are new objects.
        """
        await self.stop()
        self._fresh()
        await self.start()


def fleet_configs(config: SimConfig, count: int, speeds: Sequence[float] | None = None) -> list[SimConfig]:
    """Per-server configs: names sim-0..N-1, distinct seeds, optional per-server speed."""
    if speeds is not None and len(speeds) not in (1, count):
        raise ValueError(f"got {len(speeds)} speed factors for {count} servers")
    out = []
    for i in range(count):
        speed = config.speed if speeds is None else speeds[0 if len(speeds) == 1 else i]
        out.append(dataclasses.replace(config, name=f"sim-{i}", seed=config.seed + i, speed=speed))
    return out


def placements(ports: Sequence[int], hosts: Sequence[str]) -> list[tuple[str, int, int]]:
    """(host, port, rank) per server: hosts and ports pair up, and a single one applies to all.

    ``rank`` numbers the servers sharing an address, so their KV event ports differ.
    """
    if not ports or not hosts:
        raise ValueError("need at least one port and one host")
    count = max(len(ports), len(hosts))
    if len(ports) not in (1, count) or len(hosts) not in (1, count):
        raise ValueError(f"got {len(ports)} ports for {len(hosts)} hosts: give one, or one per server, of each")
    seen: dict[str, int] = {}
    out = []
    for i in range(count):
        host = hosts[0 if len(hosts) == 1 else i]
        port = ports[0 if len(ports) == 1 else i]
        rank = seen.get(host, 0)
        seen[host] = rank + 1
        out.append((host, port, rank))
    return out


class SimFleet:
    """Several servers in one process; ``ports`` may contain 0 for a free port.

    ``hosts`` puts server i on ``hosts[i]`` (one port for all, or one each); without
    it every server is on ``host``.
    """

    def __init__(
        self,
        ports: Sequence[int] = (0,),
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        hosts: Sequence[str] | None = None,
        speeds: Sequence[float] | None = None,
        configs: Sequence[SimConfig] | None = None,
    ) -> None:
        where = placements(ports, hosts or [host])
        if configs is None:
            configs = fleet_configs(config or SimConfig(), len(where), speeds)
        elif len(configs) != len(where):
            raise ValueError(f"need one config per server ({len(where)})")
        self.servers = [SimServer(cfg, h, p, rank=r) for cfg, (h, p, r) in zip(configs, where)]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def kv_events_endpoints(self) -> list[str | None]:
        return [s.kv_events_endpoint for s in self.servers]

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
    hosts: Sequence[str] | None = None,
    speeds: Sequence[float] | None = None,
) -> SimFleet:
    """Start a fleet and return it; call ``await fleet.stop()`` when done."""
    return await SimFleet(ports, config, host=host, hosts=hosts, speeds=speeds).start()
