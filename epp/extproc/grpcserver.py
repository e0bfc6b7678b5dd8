"""Assembles the gRPC servers: ext_proc (+ health) on the main port, health on its own port.

The ext_proc port runs on one of two cores: ``fast`` (default; ``fastserver.py``, our
single-protocol HTTP/2 server, about 4x less CPU per request) or ``grpcio`` (grpcio's
asyncio server). ``EPP_EXTPROC_CORE=grpcio`` selects the latter, e.g. to rule the fast core
out when debugging. The separate health port always uses grpcio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc

from epp.extproc.fastserver import FastExtProcServer
from epp.extproc.h2.limits import Limits
from epp.extproc.health import HealthService, add_health
from epp.extproc.service import ExtProcService
from epp.extproc.tls import CertificateReloader, server_credentials

# Room for the largest request body in one message (BUFFERED mode sends the body whole).
MESSAGE_MARGIN = 1 << 20


def server_options(max_body_bytes: int, limits: Limits | None = None) -> list[tuple[str, int]]:
    limit = max_body_bytes + MESSAGE_MARGIN
    h2 = limits or Limits()
    idle = [("grpc.max_connection_idle_ms", int(h2.idle_timeout * 1000))] if h2.idle_timeout > 0 else []
    return [
        # The fast core's HTTP/2 limits, where grpcio has them (it has no connection limit).
        ("grpc.max_concurrent_streams", h2.max_concurrent_streams),
        *idle,
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Two EPPs must never silently share a port (gRPC enables SO_REUSEPORT by default).
        ("grpc.so_reuseport", 0),
        # Envoy keeps one long-lived HTTP/2 connection; let it ping us.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class PortInUseError(OSError):
    pass


CORES = ("fast", "grpcio")


def default_core() -> str:
    core = os.environ.get("EPP_EXTPROC_CORE", "fast")
    if core not in CORES:
        raise ValueError(f"EPP_EXTPROC_CORE must be one of {', '.join(CORES)}, got {core!r}")
    return core


@dataclass
class GrpcServers:
    extproc: Any  # grpc.aio.Server or FastExtProcServer
    health: grpc.aio.Server | None
    extproc_port: int
    health_port: int | None
    reloader: CertificateReloader | None
    core: str = "grpcio"

    async def start(self) -> None:
        await self.extproc.start()
        if self.health is not None:
            await self.health.start()

    async def stop(self, grace: float = 1.0) -> None:
        if self.health is not None:
            await self.health.stop(grace)
        await self.extproc.stop(grace)


def _bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    try:
        port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    except RuntimeError as e:  # grpc raises RuntimeError("Failed to bind ...")
        raise PortInUseError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise PortInUseError(f"cannot listen on {address} (in use?)")
    return port


def _health_server(health: HealthService, host: str, health_port: int | None) -> tuple[grpc.aio.Server | None, int | None]:
    if health_port is None:
        return None, None
    hs = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    add_health(hs, health)
    return hs, _bind(hs, f"{host}:{health_port}", None)


async def start_grpc_servers(service: ExtProcService, health: HealthService, *, host: str, port: int,
                             health_port: int | None, secure: bool, cert_path: str | None,
                             max_body_bytes: int, core: str | None = None, limits: Limits | None = None) -> GrpcServers:
    """Bind and start everything; ``core`` defaults to ``default_core()``; ``limits``: the
    HTTP/2 limits of the ext_proc port (defaults: ``Limits()``)."""
    core = core or default_core()
    if core == "grpcio":
        servers = build_grpc_servers(service, health, host=host, port=port, health_port=health_port, secure=secure,
                                     cert_path=cert_path, max_body_bytes=max_body_bytes, limits=limits)
        await servers.start()
        return servers
    fast = FastExtProcServer(service, health, secure=secure, cert_path=cert_path,
                             max_message=max_body_bytes + MESSAGE_MARGIN, limits=limits)
    try:
        bound = await fast.bind(host, port)
    except OSError as e:
        raise PortInUseError(f"cannot listen on {host}:{port}: {e}") from None
    hs, hport = _health_server(health, host, health_port)
    servers = GrpcServers(fast, hs, bound, hport, fast.reloader, core="fast")
    await servers.start()
    return servers


def build_grpc_servers(service: ExtProcService, health: HealthService, *, host: str, port: int,
                       health_port: int | None, secure: bool, cert_path: str | None,
                       max_body_bytes: int, limits: Limits | None = None) -> GrpcServers:
    """The grpcio core (not started)."""
    opts = server_options(max_body_bytes, limits)
    ext = grpc.aio.server(options=opts)
    ext.add_generic_rpc_handlers((service.handler(),))
    add_health(ext, health)
    reloader = None
    creds = None
    if secure:
        creds, reloader = server_credentials(cert_path)
    bound = _bind(ext, f"{host}:{port}", creds)
    hs, hport = _health_server(health, host, health_port)
    return GrpcServers(ext, hs, bound, hport, reloader, core="grpcio")
